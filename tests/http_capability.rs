//! `http.send` against a real server on a loopback port: allowlist, address
//! rules, retries with backoff and `Retry-After`, timeouts, body cap.

mod support;

use std::sync::Arc;
use std::time::Duration;

use quern_runtime::http::{HostRule, HttpSettings};
use quern_runtime::registry::read_component;
use quern_runtime::{HandlerVersion, JobSpec, Outcome, RunOptions, Runtime, RuntimeSettings};
use serde_json::{Value, json};
use support::{Reply, Upstream, dist};

fn runtime_with(http: HttpSettings) -> Arc<Runtime> {
    Arc::new(Runtime::new(RuntimeSettings { http, ..support::settings() }).unwrap())
}

fn fast_retries() -> HttpSettings {
    HttpSettings { first_backoff: Duration::from_millis(20), ..HttpSettings::default() }
}

fn caller(runtime: &Runtime, hosts: &[String]) -> HandlerVersion {
    let (bytes, mut manifest) = read_component(&dist("fixtures/hostile.wasm")).unwrap();
    manifest.allowed_hosts = hosts.iter().map(|h| HostRule::parse(h).unwrap()).collect();
    runtime.load(&bytes, manifest).unwrap()
}

/// Has the fixture send one request; returns `Ok(response)` or `Err(host error)`.
async fn send(runtime: &Runtime, handler: &HandlerVersion, request: Value) -> Result<Value, String> {
    let mut input = json!({"mode": "http"});
    input.as_object_mut().unwrap().extend(request.as_object().unwrap().clone());
    let job = JobSpec { id: "j-http".into(), input: input.to_string(), attempt: 1, max_attempts: 1 };
    match runtime.run(handler, &job, RunOptions::default()).await.outcome {
        Outcome::Completed { output } => Ok(serde_json::from_str(&output).unwrap()),
        Outcome::Failed { reason } => Err(reason),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::test]
async fn allowlisted_loopback_server_is_reached() {
    let upstream = Upstream::start(vec![], Reply::new(200, "fine")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let response = send(&runtime, &handler, json!({"url": upstream.url("/ok")})).await.unwrap();
    assert_eq!(response, json!({"status": 200, "body": "fine"}));
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test]
async fn service_unavailable_is_retried_until_it_answers() {
    let upstream = Upstream::start(vec![Reply::new(503, "down"), Reply::new(503, "down")], Reply::new(200, "up")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let response = send(&runtime, &handler, json!({"url": upstream.url("/flaky")})).await.unwrap();
    assert_eq!(response["status"], 200);
    assert_eq!(upstream.received().len(), 3, "two 503s, then the 200");
}

#[tokio::test]
async fn retries_stop_after_three_tries_and_the_last_response_is_returned() {
    let upstream = Upstream::start(vec![], Reply::new(503, "still down")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let response = send(&runtime, &handler, json!({"url": upstream.url("/down")})).await.unwrap();
    assert_eq!(response, json!({"status": 503, "body": "still down"}));
    assert_eq!(upstream.received().len(), 3);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let upstream =
        Upstream::start(vec![Reply::new(503, "busy").header("retry-after", "1")], Reply::new(200, "ok")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let response = send(&runtime, &handler, json!({"url": upstream.url("/busy")})).await.unwrap();
    assert_eq!(response["status"], 200);
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_secs(1), "the retry came {gap:?} after the 503, before its Retry-After of 1 s");
}

#[tokio::test]
async fn a_long_retry_after_goes_back_to_the_handler_instead_of_being_waited_out() {
    let upstream = Upstream::start(vec![], Reply::new(429, "quota").header("retry-after", "120")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let response = send(&runtime, &handler, json!({"url": upstream.url("/quota")})).await.unwrap();
    assert_eq!(response["status"], 429);
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test]
async fn a_post_is_not_resent_after_an_ambiguous_bad_gateway() {
    let upstream = Upstream::start(vec![], Reply::new(502, "gateway")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let response = send(&runtime, &handler, json!({"url": upstream.url("/send"), "method": "POST"})).await.unwrap();
    assert_eq!(response["status"], 502);
    assert_eq!(upstream.received().len(), 1, "a 502 may hide a processed POST: never resend it");
}

#[tokio::test]
async fn a_post_declared_idempotent_is_retried_on_bad_gateway() {
    let upstream = Upstream::start(vec![Reply::new(502, "gateway")], Reply::new(200, "ok")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let request = json!({"url": upstream.url("/chat"), "method": "POST", "idempotent": true});
    assert_eq!(send(&runtime, &handler, request).await.unwrap()["status"], 200);
    assert_eq!(upstream.received().len(), 2);
}

#[tokio::test]
async fn a_host_outside_the_allowlist_is_denied_naming_the_rules() {
    let upstream = Upstream::start(vec![], Reply::new(200, "never")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &["api.example.com".into(), "127.0.0.1:1".into()]);
    let error = send(&runtime, &handler, json!({"url": upstream.url("/x")})).await.unwrap_err();
    assert!(error.contains(&format!("host 127.0.0.1:{} is not allowed", upstream.addr.port())), "{error}");
    assert!(error.contains("(api.example.com, 127.0.0.1:1)"), "{error}");
    assert!(upstream.received().is_empty());
}

/// A rule with a scheme (`https://host:port`) admits that scheme only: the
/// same host and port over plain http is refused before any byte is sent.
#[tokio::test]
async fn a_rule_naming_https_refuses_plain_http_to_the_same_host() {
    let upstream = Upstream::start(vec![], Reply::new(200, "reached")).await;
    let runtime = runtime_with(fast_retries());
    let https_only = caller(&runtime, &[format!("https://{}", upstream.addr)]);
    let error = send(&runtime, &https_only, json!({"url": upstream.url("/x")})).await.unwrap_err();
    assert!(error.contains("is not allowed over http"), "{error}");
    assert!(upstream.received().is_empty(), "nothing reached the upstream");
    let http_rule = caller(&runtime, &[format!("http://{}", upstream.addr)]);
    let response = send(&runtime, &http_rule, json!({"url": upstream.url("/x")})).await.unwrap();
    assert_eq!(response, json!({"status": 200, "body": "reached"}), "the rule naming http admits it");
}

#[tokio::test]
async fn a_private_address_under_a_wildcard_rule_is_denied() {
    let upstream = Upstream::start(vec![], Reply::new(200, "never")).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &["*".into()]);
    let error = send(&runtime, &handler, json!({"url": upstream.url("/x")})).await.unwrap_err();
    assert!(error.contains("address 127.0.0.1"), "{error}");
    assert!(error.contains("is loopback"), "{error}");
    assert!(error.contains("wildcard rule `*`"), "{error}");
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn a_private_host_listed_exactly_by_name_is_reached() {
    let upstream = Upstream::start(vec![], Reply::new(200, "local")).await;
    let runtime = runtime_with(fast_retries());
    let port = upstream.addr.port();
    let handler = caller(&runtime, &[format!("localhost:{port}")]);
    let response = send(&runtime, &handler, json!({"url": format!("http://localhost:{port}/x")})).await.unwrap();
    assert_eq!(response["body"], "local");
}

#[tokio::test]
async fn a_slow_upstream_times_out() {
    let upstream = Upstream::start(vec![], Reply::new(200, "late").after(Duration::from_secs(3))).await;
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let error = send(&runtime, &handler, json!({"url": upstream.url("/slow"), "timeout_ms": 200})).await.unwrap_err();
    assert!(error.contains("Timeout(\"no complete response within 200 ms\")"), "{error}");
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let upstream = Upstream::start(vec![], Reply::new(200, &"x".repeat(4096))).await;
    let runtime = runtime_with(HttpSettings { max_body_bytes: 1024, ..fast_retries() });
    let handler = caller(&runtime, &[upstream.addr.to_string()]);
    let error = send(&runtime, &handler, json!({"url": upstream.url("/big")})).await.unwrap_err();
    assert!(error.contains("BodyTooLarge(\"the response body exceeds the limit of 1 KiB\")"), "{error}");
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let runtime = runtime_with(fast_retries());
    let handler = caller(&runtime, &[addr.to_string()]);
    let error = send(&runtime, &handler, json!({"url": format!("http://{addr}/")})).await.unwrap_err();
    assert!(error.contains("Connect(") && error.contains("Connection refused"), "{error}");
}

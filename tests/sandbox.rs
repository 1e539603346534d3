//! A handler that misbehaves ends its own job with a permanent failure that
//! names the cause, in time, and the process keeps running other jobs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_runtime::http::HostRule;
use quern_runtime::registry::read_component;
use quern_runtime::{HandlerVersion, JobSpec, Outcome, RunOptions, Runtime};
use serde_json::json;
use support::{dist, load, runtime};

fn job(input: serde_json::Value) -> JobSpec {
    JobSpec { id: "0190b7a4-0000-7000-8000-000000000001".into(), input: input.to_string(), attempt: 1, max_attempts: 1 }
}

fn hostile_allowing(runtime: &Runtime, hosts: &[&str]) -> HandlerVersion {
    let (bytes, mut manifest) = read_component(&dist("fixtures/hostile.wasm")).unwrap();
    manifest.allowed_hosts.extend(hosts.iter().map(|h| HostRule::parse(h).unwrap()));
    runtime.load(&bytes, manifest).unwrap()
}

/// Runs `input` on the hostile fixture, expects a permanent failure whose
/// reason contains `cause` within the deadline + 1 s, then proves an echo job
/// on the same runtime still completes.
async fn fails_naming(
    runtime: &Arc<Runtime>,
    hostile: &HandlerVersion,
    input: serde_json::Value,
    cause: &str,
) -> String {
    let started = Instant::now();
    let report = runtime.run(hostile, &job(input), RunOptions::default()).await;
    let elapsed = started.elapsed();
    let reason = match report.outcome {
        Outcome::Failed { reason } => reason,
        other => panic!("expected a permanent failure naming {cause:?}, got {other:?}"),
    };
    assert!(reason.contains(cause), "reason {reason:?} does not name {cause:?}");
    assert!(
        elapsed <= hostile.limits.deadline + Duration::from_secs(1),
        "took {elapsed:?}, past the deadline of {:?} + 1 s",
        hostile.limits.deadline
    );

    let echo = load(runtime, "echo.wasm");
    let report = runtime.run(&echo, &job(json!({"after": cause})), RunOptions::default()).await;
    assert!(matches!(report.outcome, Outcome::Completed { .. }), "echo after the hostile job: {:?}", report.outcome);
    reason
}

#[tokio::test]
async fn infinite_loop_fails_at_the_deadline() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let reason = fails_naming(&runtime, &hostile, json!({"mode": "spin"}), "exceeded deadline").await;
    assert_eq!(reason, "exceeded deadline of 2 s");
}

#[tokio::test]
async fn memory_bomb_fails_naming_the_memory_limit() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let reason = fails_naming(&runtime, &hostile, json!({"mode": "memory"}), "memory limit").await;
    assert_eq!(reason, "exceeded memory limit of 32 MiB");
}

#[tokio::test]
async fn deep_recursion_fails_as_a_stack_overflow() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    fails_naming(&runtime, &hostile, json!({"mode": "recursion"}), "stack overflow").await;
}

#[tokio::test]
async fn huge_output_fails_naming_the_output_limit() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let reason = fails_naming(&runtime, &hostile, json!({"mode": "huge-output", "mib": 2}), "output limit").await;
    assert!(reason.ends_with("exceeds the output limit of 1 MiB"), "{reason}");
}

#[tokio::test]
async fn panic_fails_with_the_panic_message() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let reason = fails_naming(&runtime, &hostile, json!({"mode": "panic", "message": "boom"}), "panicked").await;
    assert!(reason.starts_with("the handler panicked: boom (at "), "{reason}");
}

#[tokio::test]
async fn exit_fails_naming_the_status() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    fails_naming(&runtime, &hostile, json!({"mode": "exit", "code": 3}), "exited with status 1").await;
}

#[tokio::test]
async fn request_to_an_unlisted_host_is_denied() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let input = json!({"mode": "http", "url": "http://api.example.com/v1/x"});
    let reason = fails_naming(&runtime, &hostile, input, "Denied").await;
    assert!(reason.contains("host api.example.com:80 is not allowed"), "{reason}");
    assert!(reason.contains("no [http] allowed_hosts"), "{reason}");
}

#[tokio::test]
async fn request_to_the_metadata_address_is_denied_even_under_a_wildcard() {
    let runtime = runtime();
    let hostile = hostile_allowing(&runtime, &["*"]);
    let input = json!({"mode": "http", "url": "http://169.254.169.254/latest/meta-data/"});
    let reason = fails_naming(&runtime, &hostile, input, "Denied").await;
    assert!(reason.contains("address 169.254.169.254"), "{reason}");
    assert!(reason.contains("cloud metadata address"), "{reason}");
}

#[tokio::test]
async fn cancelling_a_running_job_interrupts_it_within_a_second() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let options = RunOptions::default();
    let cancel = options.cancel.clone();
    let running = {
        let runtime = runtime.clone();
        tokio::spawn(async move { runtime.run(&hostile, &job(json!({"mode": "spin"})), options).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await; // let it get going; the assertion does not depend on it
    let cancelled_at = Instant::now();
    cancel.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.outcome, Outcome::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(1), "took {:?}", cancelled_at.elapsed());
}

#[tokio::test]
async fn a_spinning_job_does_not_hold_up_others() {
    let runtime = runtime();
    let hostile = Arc::new(load(&runtime, "fixtures/hostile.wasm"));
    let echo = load(&runtime, "echo.wasm");
    let spinning = {
        let (runtime, hostile) = (runtime.clone(), hostile.clone());
        tokio::spawn(async move { runtime.run(&hostile, &job(json!({"mode": "spin"})), RunOptions::default()).await })
    };
    for n in 0..20 {
        let report = runtime.run(&echo, &job(json!({"n": n})), RunOptions::default()).await;
        assert!(matches!(report.outcome, Outcome::Completed { .. }), "{:?}", report.outcome);
    }
    assert!(!spinning.is_finished(), "the spinning job should still be running (deadline 2 s)");
    let report = spinning.await.unwrap();
    assert!(matches!(report.outcome, Outcome::Failed { ref reason } if reason.contains("deadline")));
}

#[tokio::test]
async fn handler_output_on_stdout_and_stderr_does_not_break_the_job() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let report = runtime
        .run(
            &hostile,
            &job(json!({"mode": "print", "stdout": "to stdout", "stderr": "to stderr"})),
            RunOptions::default(),
        )
        .await;
    assert_eq!(report.outcome, Outcome::Completed { output: r#"{"printed":true}"#.into() });
}

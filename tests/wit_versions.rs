//! The host runs every world it lists (docs/wit-versions.md): a component
//! built against 0.1 (the echo of that time, kept as a fixture) and one built
//! against 0.2 load, run and reach the same capabilities, side by side in one
//! process; what 0.2 added (the deadline, the log level, the method) arrives.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quern_runtime::registry::read_component;
use quern_runtime::{JobSpec, Outcome, RunOptions, WORLDS};
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Options, Server};
use support::{dist, load, runtime};

fn job(input: Value) -> JobSpec {
    JobSpec { id: "0190b7a4-0000-7000-8000-0000000000a1".into(), input: input.to_string(), attempt: 1, max_attempts: 3 }
}

fn output(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Completed { output } => serde_json::from_str(&output).unwrap(),
        other => panic!("expected a completed job, got {other:?}"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn the_host_lists_0_2_first_then_0_1() {
    assert_eq!(WORLDS, ["quern:handler/handler@0.2.0", "quern:handler/handler@0.1.0"]);
}

#[tokio::test]
async fn each_component_is_linked_against_the_world_it_was_built_for() {
    let runtime = runtime();
    assert_eq!(load(&runtime, "echo.wasm").world(), "quern:handler/handler@0.2.0");
    assert_eq!(load(&runtime, "fixtures/hostile.wasm").world(), "quern:handler/handler@0.2.0");
    assert_eq!(load(&runtime, "fixtures/echo_v0_1.wasm").world(), "quern:handler/handler@0.1.0");
}

#[tokio::test]
async fn a_0_1_component_runs_and_its_requests_pass_the_same_policy() {
    let runtime = runtime();
    let old = load(&runtime, "fixtures/echo_v0_1.wasm");
    let report = runtime.run(&old, &job(json!({"url": "http://example.com/x"})), RunOptions::default()).await;
    let out = output(report.outcome);
    assert_eq!(out["echo"]["url"], "http://example.com/x");
    assert_eq!(out["job"]["attempt"], 1);
    assert_eq!(out["job"]["max_attempts"], 3);
    // Its method was text ("get"): it reached the policy as GET, which
    // refused the host because the fixture's manifest allows none.
    let denied = out["fetched"]["denied"].as_str().unwrap_or_else(|| panic!("not denied: {out}"));
    assert!(denied.contains("host example.com:80 is not allowed"), "{denied}");
    assert!(denied.contains("`echo_v0_1` has no [http] allowed_hosts"), "{denied}");
}

#[tokio::test]
async fn a_0_1_component_that_fails_fails_as_it_says() {
    let runtime = runtime();
    let old = load(&runtime, "fixtures/echo_v0_1.wasm");
    let report = runtime.run(&old, &job(json!([1, 2])), RunOptions::default()).await;
    assert_eq!(report.outcome, Outcome::Failed { reason: "invalid input: expected a JSON object".into() });
}

#[tokio::test]
async fn a_0_2_job_carries_the_deadline_of_its_attempt() {
    let runtime = runtime();
    let hostile = load(&runtime, "fixtures/hostile.wasm");
    let deadline = hostile.limits.deadline.as_millis() as u64;
    let before = unix_ms();
    let report = runtime.run(&hostile, &job(json!({"mode": "deadline"})), RunOptions::default()).await;
    let after = unix_ms();
    let out = output(report.outcome);
    let at = out["deadline_unix_ms"].as_u64().unwrap();
    assert!(
        (before + deadline..=after + deadline).contains(&at),
        "deadline {at} not within [{before}, {after}] + {deadline}"
    );
    let remaining = out["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= deadline, "remaining {remaining} ms of a {deadline} ms deadline");
}

#[tokio::test]
async fn a_0_1_and_a_0_2_component_run_side_by_side_in_one_serve() {
    let db = Db::sqlite().await;
    let (_, manifest) = read_component(&dist("fixtures/echo_v0_1.wasm")).unwrap();
    let options = Options {
        components: vec![("echo_v0_1", "fixtures/echo_v0_1.wasm", manifest.source.clone())],
        ..Options::default()
    };
    let server = Server::start_with(&db, options).await;
    let user = server.token("ana");

    let mut ids = Vec::new();
    for (job_type, input) in [
        ("echo_v0_1", json!({"from": "0.1"})),
        ("echo", json!({"from": "0.2"})),
        ("hostile", json!({"mode": "log", "message": "levels from 0.2"})),
    ] {
        let answer = server.enqueue(&user, job_type, input).await;
        assert_eq!(answer.status, 202, "{job_type}: {}", answer.text);
        ids.push(answer.body["id"].as_str().unwrap().to_string());
    }
    let done = |job: &Value| job["status"] == "completed";
    let old = server.poll_job(&user, &ids[0], Duration::from_secs(30), done).await;
    let new = server.poll_job(&user, &ids[1], Duration::from_secs(30), done).await;
    server.poll_job(&user, &ids[2], Duration::from_secs(30), done).await;
    assert_eq!(old["result"]["echo"]["from"], "0.1", "{old}");
    assert_eq!(old["result"]["job"]["type"], "echo_v0_1", "{old}");
    assert_eq!(new["result"]["echo"]["from"], "0.2", "{new}");

    // The 0.1 component's text level and the 0.2 enum both reach the log at
    // their level.
    let lines: Vec<Value> = server.log().lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let logged = |message: &str, level: &str| {
        lines.iter().any(|line| line["message"] == message && line["level"] == level && line["job_type"].is_string())
    };
    let loaded = |job_type: &str, world: &str| {
        lines
            .iter()
            .any(|line| line["message"] == "handler loaded" && line["job_type"] == job_type && line["world"] == world)
    };
    assert!(loaded("echo_v0_1", WORLDS[1]), "no `handler loaded` line naming echo_v0_1's world 0.1");
    assert!(loaded("echo", WORLDS[0]), "no `handler loaded` line naming echo's world 0.2");
    assert!(logged("echoing", "INFO"), "no INFO line `echoing` from the 0.1 component");
    assert!(logged("levels from 0.2 (info)", "INFO"), "no INFO line from the 0.2 component");
    assert!(logged("levels from 0.2 (warn)", "WARN"), "no WARN line from the 0.2 component");
    assert!(logged("levels from 0.2 (error)", "ERROR"), "no ERROR line from the 0.2 component");
    // A dependency's `log` record reaches the host through the SDK's backend.
    assert!(logged("a_dependency::client: levels from 0.2 (log crate)", "WARN"), "no WARN line from the `log` crate");
    server.finish().await;
    db.cleanup().await;
}

//! A handler author's first minutes, as one test: `quern new`, the crate's
//! unit and harness tests, the component build, `quern run`, `quern handlers
//! push` to a running `quern serve`, and a completed job.
//!
//! It runs in a project laid out like quern's (a workspace whose members are
//! `handlers/*` and whose dependency table is quern's), sharing quern's build
//! directory, so only the new crate is compiled. A first handler (the `http`
//! template) compiles what the harness needs; the second (`plain`) is the one
//! timed. Both times are printed (`--nocapture`); none is asserted.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::db::Db;
use support::project::Project;
use support::server::Server;

/// Each step's time, printed at the end.
struct Steps(Vec<(&'static str, Duration)>, Instant);

impl Steps {
    fn start() -> Self {
        Self(Vec::new(), Instant::now())
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.0.push((step, now - self.1));
        self.1 = now;
    }

    fn report(&self, flow: &str) -> Duration {
        let total: Duration = self.0.iter().map(|(_, took)| *took).sum();
        let steps: Vec<String> =
            self.0.iter().map(|(step, took)| format!("{step} {:.1} s", took.as_secs_f64())).collect();
        eprintln!("author flow, {flow}: {:.1} s end to end ({})", total.as_secs_f64(), steps.join(", "));
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_handler_is_tested_built_run_and_pushed_to_a_running_quern() {
    let project = Project::new();

    // The `http` template first: it compiles what every handler's tests need.
    let mut first = Steps::start();
    let created = project.quern(&["new", "weather", "--template", "http"]);
    assert!(created.contains("created handlers/weather (http template)"), "{created}");
    assert!(!created.contains("note:"), "the glob covers it: {created}");
    project.cargo(&["xtask", "build-handlers"]);
    first.done("build");
    let tested = project.cargo(&["test", "-p", "weather"]);
    assert_eq!(tested.matches("test result: ok. 2 passed").count(), 2, "unit and harness tests: {tested}");
    first.done("test");
    first.report("http template, compiling the harness's dependencies");

    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    let (ops, user) = (server.service_token(), server.token("ana"));

    let mut steps = Steps::start();
    let created = project.quern(&["new", "demo"]);
    assert!(created.contains("cargo test -p demo"), "it says what to do next: {created}");
    steps.done("new");
    project.cargo(&["xtask", "build-handlers"]);
    assert!(
        project.path().join("handlers-dist/demo.wasm").is_file()
            && project.path().join("handlers-dist/demo.toml").is_file()
    );
    steps.done("build");
    let tested = project.cargo(&["test", "-p", "demo"]);
    assert_eq!(tested.matches("test result: ok. 2 passed").count(), 2, "unit and harness tests: {tested}");
    steps.done("test");
    let ran = project.quern(&["run", "handlers-dist/demo.wasm", "--input", r#"{"name": "Ana", "shout": true}"#]);
    let result = serde_json::Deserializer::from_str(&ran).into_iter::<serde_json::Value>().next();
    assert_eq!(result.and_then(Result::ok), Some(json!({"greeting": "HELLO, ANA"})), "{ran}");
    steps.done("run");
    let pushed = project.run(
        "quern handlers push",
        Command::new(env!("CARGO_BIN_EXE_quern"))
            .args(["handlers", "push", "handlers-dist/demo.wasm"])
            .env("QUERN_URL", &server.base)
            .env("QUERN_TOKEN", &ops),
    );
    assert!(pushed.contains("demo ") && pushed.contains("uploaded"), "{pushed}");
    let answer = server.enqueue(&user, "demo", json!({"name": "Beatriz"})).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let id = answer.body["id"].as_str().unwrap().to_string();
    let job = server.poll_job(&user, &id, Duration::from_secs(30), |job| job["status"] == "completed").await;
    assert_eq!(job["result"], json!({"greeting": "hello, Beatriz"}));
    steps.done("push and a completed job");
    steps.report("plain template, excluding the first compile");

    server.finish().await;
    db.cleanup().await;
}

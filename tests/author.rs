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

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;
use support::db::Db;
use support::server::Server;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A temporary workspace like quern's, with quern's dependencies by path.
struct Project {
    dir: tempfile::TempDir,
    target: PathBuf,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(REPO);
        let manifest: toml::Table = std::fs::read_to_string(repo.join("Cargo.toml")).unwrap().parse().unwrap();
        let workspace = manifest["workspace"].as_table().unwrap();
        let mut dependencies = workspace["dependencies"].as_table().unwrap().clone();
        for (_, spec) in dependencies.iter_mut() {
            if let Some(path) = spec.get_mut("path") {
                *path = toml::Value::String(repo.join(path.as_str().unwrap()).display().to_string());
            }
        }
        let mut root = toml::Table::new();
        root.insert(
            "workspace".into(),
            toml::Value::Table(toml::Table::from_iter([
                ("resolver".to_string(), toml::Value::String("3".into())),
                ("members".to_string(), toml::Value::Array(vec![toml::Value::String("handlers/*".into())])),
                ("package".to_string(), workspace["package"].clone()),
                ("dependencies".to_string(), toml::Value::Table(dependencies)),
            ])),
        );
        // The same profiles, so what quern's build already compiled is reused.
        if let Some(profile) = manifest.get("profile") {
            root.insert("profile".into(), profile.clone());
        }
        std::fs::write(dir.path().join("Cargo.toml"), toml::to_string(&root).unwrap()).unwrap();
        std::fs::copy(repo.join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
        std::fs::create_dir(dir.path().join("handlers")).unwrap();
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
        Self { dir, target }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a command in the project; panics with its output when it fails.
    fn run(&self, what: &str, command: &mut Command) -> String {
        let output: Output = command
            .current_dir(self.path())
            .env("CARGO_TARGET_DIR", &self.target)
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(output.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", output.status);
        stdout + &stderr
    }

    fn quern(&self, args: &[&str]) -> String {
        self.run(&format!("quern {}", args.join(" ")), Command::new(env!("CARGO_BIN_EXE_quern")).args(args))
    }

    fn cargo(&self, args: &[&str]) -> String {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        self.run(&format!("cargo {}", args.join(" ")), Command::new(cargo).args(args))
    }

    /// `cargo xtask build-handlers`, as quern's alias runs it, on this project.
    fn build_handlers(&self) -> String {
        let xtask = Path::new(REPO).join("xtask/Cargo.toml");
        self.cargo(&["run", "--quiet", "--manifest-path", xtask.to_str().unwrap(), "--", "build-handlers"])
    }
}

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
    project.build_handlers();
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
    project.build_handlers();
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

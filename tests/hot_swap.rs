//! A watched handlers directory: a new build is swapped in for new jobs
//! within a second, running jobs finish on the version they started on, and
//! a bad file changes nothing.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_runtime::registry::{Registry, RegistryEvent};
use quern_runtime::{JobSpec, Outcome, RunOptions};
use serde_json::json;
use support::{cache_dir, dist, poll_until, runtime};
use tokio::sync::broadcast;

/// Replaces `to` in one step, as a deploy should (write aside, then rename).
fn replace(to: &Path, bytes: &[u8]) {
    let aside = to.with_extension("partial");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, to).unwrap();
}

fn job(input: serde_json::Value) -> JobSpec {
    JobSpec { id: "j-swap".into(), input: input.to_string(), attempt: 1, max_attempts: 3 }
}

/// A directory serving `echo`, whose first version is the fixture component
/// (it can sleep, so a job can be held on it) under echo's manifest.
fn watched_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("fixtures/hostile.wasm"), dir.path().join("echo.wasm")).unwrap();
    std::fs::copy(dist("echo.toml"), dir.path().join("echo.toml")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_serves_new_jobs_within_a_second_while_a_running_job_finishes_on_its_version() {
    let dir = watched_dir();
    let registry = Registry::new(runtime());
    registry.load_dir(dir.path()).unwrap();
    let _watch = registry.watch(dir.path()).unwrap();
    let old = registry.get("echo").unwrap();

    let running = {
        let (registry, old) = (registry.clone(), old.clone());
        tokio::spawn(async move {
            let input = json!({"mode": "sleep", "ms": 2000, "tag": "old"});
            registry.runtime().run(&old, &job(input), RunOptions::default()).await
        })
    };

    let swapped_at = Instant::now();
    replace(&dir.path().join("echo.wasm"), &std::fs::read(dist("echo.wasm")).unwrap());
    let new = poll_until(Duration::from_secs(1), "the new echo version", || {
        registry.get("echo").filter(|current| current.version != old.version)
    })
    .await;
    let switched_after = swapped_at.elapsed();
    assert!(!running.is_finished(), "the old job should still be running when the new version arrives");

    let report = registry.runtime().run(&new, &job(json!({"a": 1})), RunOptions::default()).await;
    let Outcome::Completed { output } = report.outcome else { panic!("new job: {:?}", report.outcome) };
    assert!(output.contains(r#""echo":{"a":1}"#), "{output}");
    assert_eq!(report.version, new.version);

    let old_report = running.await.unwrap();
    assert_eq!(old_report.version, old.version, "the running job finished on the version it started on");
    assert_eq!(old_report.outcome, Outcome::Completed { output: r#"{"slept_ms":2000,"tag":"old"}"#.into() });
    eprintln!("switched after {switched_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_leaves_the_previous_version_serving() {
    let dir = watched_dir();
    let registry = Registry::new(runtime());
    registry.load_dir(dir.path()).unwrap();
    let _watch = registry.watch(dir.path()).unwrap();
    let serving = registry.get("echo").unwrap().version.clone();
    let mut events = registry.subscribe();

    let wasm = dir.path().join("echo.wasm");
    replace(&wasm, b"this is not a component");
    let rejected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(RegistryEvent::Rejected { path, error }) = events.recv().await {
                return (path, error);
            }
        }
    })
    .await
    .expect("the bad file is reported");
    assert_eq!(rejected.0, wasm);
    assert!(rejected.1.contains("not a WebAssembly file"), "{}", rejected.1);

    let current = registry.get("echo").unwrap();
    assert_eq!(current.version, serving);
    let report = registry.runtime().run(&current, &job(json!({"mode": "sleep", "ms": 1})), RunOptions::default()).await;
    assert!(matches!(report.outcome, Outcome::Completed { .. }), "{:?}", report.outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_change_alone_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("echo.wasm"), dir.path().join("echo.wasm")).unwrap();
    std::fs::copy(dist("echo.toml"), dir.path().join("echo.toml")).unwrap();
    let registry = Registry::new(runtime());
    registry.load_dir(dir.path()).unwrap();
    let _watch = registry.watch(dir.path()).unwrap();
    assert_eq!(registry.get("echo").unwrap().manifest.estimated_time_s, 1);

    let manifest = std::fs::read_to_string(dir.path().join("echo.toml")).unwrap();
    replace(&dir.path().join("echo.toml"), manifest.replace("estimated_time_s = 1", "estimated_time_s = 7").as_bytes());
    poll_until(Duration::from_secs(2), "the new manifest", || {
        registry.get("echo").filter(|h| h.manifest.estimated_time_s == 7)
    })
    .await;
}

/// The next registry event within `within`, if any.
async fn next_event(events: &mut broadcast::Receiver<RegistryEvent>, within: Duration) -> Option<RegistryEvent> {
    tokio::time::timeout(within, events.recv()).await.ok().map(|event| event.expect("registry events"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_files_reloads_nothing_and_a_new_build_reloads_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("echo.wasm"), dir.path().join("echo.wasm")).unwrap();
    std::fs::copy(dist("echo.toml"), dir.path().join("echo.toml")).unwrap();
    let registry = Registry::new(runtime());
    registry.load_dir(dir.path()).unwrap();
    let _watch = registry.watch(dir.path()).unwrap();
    let mut events = registry.subscribe();

    // What a backup, `sha256sum` or the README's `quern run` beside a server does.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::read(entry.unwrap().path()).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["run", dir.path().join("echo.wasm").to_str().unwrap(), "--input", "{}"])
        .env("QUERN_DATA_DIR", data.path())
        .env("QUERN_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    assert!(run.status.success(), "quern run: {}", String::from_utf8_lossy(&run.stderr));
    // The issue's window: five seconds in which nothing may be reloaded or even re-read.
    let event = next_event(&mut events, Duration::from_secs(5)).await;
    assert!(event.is_none(), "reading the handler files caused {event:?}");

    // The same build copied over again: read, found unchanged, not reloaded.
    replace(&dir.path().join("echo.wasm"), &std::fs::read(dist("echo.wasm")).unwrap());
    let event = next_event(&mut events, Duration::from_secs(5)).await;
    assert!(matches!(&event, Some(RegistryEvent::Unchanged { job_type }) if job_type == "echo"), "{event:?}");

    // A new build: exactly one reload.
    let before = registry.get("echo").unwrap().version.clone();
    let manifest = std::fs::read_to_string(dir.path().join("echo.toml")).unwrap();
    replace(&dir.path().join("echo.toml"), format!("{manifest}\n# rebuilt\n").as_bytes());
    let event = next_event(&mut events, Duration::from_secs(5)).await;
    let Some(RegistryEvent::Installed { job_type, version }) = event else {
        panic!("expected a reload, got {event:?}")
    };
    assert_eq!((job_type.as_str(), version != before), ("echo", true));
    let event = next_event(&mut events, Duration::from_secs(2)).await;
    assert!(event.is_none(), "one write, one reload; then {event:?}");
}

#[test]
fn the_registry_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<Registry>>();
}

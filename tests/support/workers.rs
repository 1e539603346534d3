//! Real `quern worker` processes: start, signal, wait for.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quern_queue::{EnqueueRequest, Queue, QueueSettings};
use quern_store::JobStatus;
use serde_json::json;
use uuid::Uuid;

use super::db::Db;
use super::{cache_dir, dist};

/// A handlers directory serving `slow`: the fixture component, which sleeps on request.
pub fn handlers_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("fixtures/hostile.wasm"), dir.path().join("slow.wasm")).unwrap();
    std::fs::write(dir.path().join("slow.toml"), "type = \"slow\"\nmax_attempts = 3\n[limits]\ndeadline_s = 30\n")
        .unwrap();
    dir
}

/// A `quern worker` process, killed when dropped: a failing test leaves
/// no worker behind.
pub struct WorkerProcess(Child);

impl std::ops::Deref for WorkerProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for WorkerProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_worker(db: &Db, handlers: &Path, id: &str, env: &[(&str, &str)]) -> WorkerProcess {
    let data = handlers.join(format!("data-{id}"));
    let log = std::fs::File::create(handlers.join(format!("{id}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_quern"))
        .arg("worker")
        .env("DATABASE_URL", &db.url)
        .env("QUERN_ADMIN_PORT", "0")
        .env("QUERN_LOG_FORMAT", "json")
        .env("QUERN_HANDLERS_DIR", handlers)
        .env("QUERN_DATA_DIR", &data)
        .env("QUERN_CACHE_DIR", cache_dir())
        .env("WORKER_ID", id)
        .env("WORKER_POLL_INTERVAL_MS", "100")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(WorkerProcess)
        .unwrap()
}

pub async fn wait_until<F: std::future::Future<Output = bool>>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for the process to exit, at most `deadline`.
pub async fn exit_code(child: &mut Child, deadline: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("the worker did not exit within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Enqueues `count` jobs of the `slow` type that sleep `sleep_ms` each.
pub async fn enqueue_slow(db: &Db, count: usize, sleep_ms: u64) -> Vec<Uuid> {
    let queue =
        Queue::new(db.store.clone(), QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    let mut ids = Vec::new();
    for n in 0..count {
        let input = json!({"mode": "sleep", "ms": sleep_ms, "tag": n.to_string()});
        let request =
            EnqueueRequest { user_id: "u1".into(), job_type: "slow".into(), input, ..EnqueueRequest::default() };
        ids.push(queue.enqueue(request).await.unwrap().id);
    }
    ids
}

/// Each job's status and worker.
pub async fn statuses(db: &Db, ids: &[Uuid]) -> Vec<(Uuid, JobStatus, Option<String>)> {
    let mut out = Vec::new();
    for id in ids {
        let job = db.store.get(*id).await.unwrap().unwrap();
        out.push((*id, job.status, job.worker_id));
    }
    out
}

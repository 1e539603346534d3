//! Test a built handler component in isolation: canned HTTP responses in, the
//! outcome and the requests it made out. No network, no queue, no database.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use quern_testing::{CannedResponse, Harness};
//! let harness = Harness::builder("handlers-dist/sofia_text.wasm")
//!     .config("OLLAMA_URL", "http://ollama.test")
//!     .build()?;
//! harness.respond("POST", "http://ollama.test/api/chat", CannedResponse::json(200, serde_json::json!({})));
//! let run = harness.run(serde_json::json!({"text": "arroz e feijão"})).await;
//! assert_eq!(run.requests.len(), 1);
//! # Ok(()) }
//! ```
//!
//! The manifest beside the component (`<type>.toml`) applies, allowlist
//! included: a request to a host it does not allow is denied, as in production.

pub mod upstreams;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use quern_runtime::config::ConfigSource;
use quern_runtime::http::{CannedHttp, HostRule, Transport};
use quern_runtime::progress::Progress;
use quern_runtime::registry::read_component;
use quern_runtime::{HandlerVersion, JobSpec, LoadError, RunOptions, Runtime, RuntimeSettings};

pub use quern_runtime::Outcome;
pub use quern_runtime::http::HttpErrorKind;

/// A response, or a transport error, to hand a handler.
#[derive(Debug, Clone)]
pub enum CannedResponse {
    Response { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    Error(HttpErrorKind, String),
}

impl CannedResponse {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self::Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self::Response { status, headers: vec![("content-type".into(), "text/plain".into())], body: body.into() }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Response { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    pub fn error(kind: HttpErrorKind, message: &str) -> Self {
        Self::Error(kind, message.into())
    }

    /// A 200 chat completion in the OpenAI wire format (what Ollama's
    /// `/v1/chat/completions`, Gemini's OpenAI endpoint and OpenAI answer).
    pub fn chat_completion(model: &str, content: &str) -> Self {
        Self::json(
            200,
            serde_json::json!({
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            }),
        )
    }
}

/// A request the handler made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(self.body.as_deref()?).ok()
    }
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct HarnessRun {
    pub outcome: Outcome,
    pub requests: Vec<RecordedRequest>,
    pub progress: Vec<Progress>,
}

impl HarnessRun {
    /// The result as JSON; panics with the outcome when the job did not complete.
    pub fn output(&self) -> serde_json::Value {
        match &self.outcome {
            Outcome::Completed { output } => serde_json::from_str(output).expect("the runtime checks results are JSON"),
            other => panic!("expected the job to complete, it ended {other:?}"),
        }
    }

    /// The reason of a permanent failure; panics with the outcome otherwise.
    pub fn failure(&self) -> &str {
        match &self.outcome {
            Outcome::Failed { reason } => reason,
            other => panic!("expected a permanent failure, the job ended {other:?}"),
        }
    }

    /// The reason and delay of a retry; panics with the outcome otherwise.
    pub fn retry(&self) -> (&str, Option<std::time::Duration>) {
        match &self.outcome {
            Outcome::Retry { reason, delay } => (reason, *delay),
            other => panic!("expected a retry, the job ended {other:?}"),
        }
    }
}

#[derive(Default)]
struct Canned {
    /// Per `METHOD url`: responses in order; the last one repeats.
    responses: Mutex<HashMap<String, Vec<CannedResponse>>>,
    requests: Mutex<Vec<RecordedRequest>>,
}

impl CannedHttp for Canned {
    fn respond(
        &self,
        request: &quern_runtime::http::Request,
    ) -> Result<quern_runtime::http::Response, quern_runtime::http::HttpError> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).push(RecordedRequest {
            method: request.method.as_str().to_ascii_uppercase(),
            url: request.url.clone(),
            headers: request.headers.clone(),
            body: request.body.clone(),
        });
        let key = format!("{} {}", request.method.as_str().to_ascii_uppercase(), request.url);
        let mut responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        let canned = match responses.get_mut(&key) {
            Some(queue) if queue.len() > 1 => queue.remove(0),
            Some(queue) if queue.len() == 1 => queue[0].clone(),
            _ => {
                return Err(
                    HttpErrorKind::Connect.into_error(format!("the test harness has no canned response for {key}"))
                );
            }
        };
        match canned {
            CannedResponse::Response { status, headers, body } => {
                Ok(quern_runtime::http::Response { status, headers, body })
            }
            CannedResponse::Error(kind, message) => Err(kind.into_error(message)),
        }
    }
}

/// Configures a [`Harness`].
pub struct HarnessBuilder {
    component: PathBuf,
    config: ConfigSource,
    extra_hosts: Vec<String>,
    cache_dir: Option<PathBuf>,
    /// The crate the component is built from, when known: a component older
    /// than its sources is refused.
    sources: Option<PathBuf>,
}

impl HarnessBuilder {
    /// Grants `key` to the handler with `value`, as if its manifest listed it.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config = self.config.with(key, value);
        self
    }

    /// Allows one more host, as if the manifest listed it.
    pub fn allow_host(mut self, rule: &str) -> Self {
        self.extra_hosts.push(rule.to_string());
        self
    }

    /// Keeps compiled components here between test runs.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    pub fn build(self) -> Result<Harness, LoadError> {
        if let Some(crate_dir) = &self.sources {
            refuse_if_stale(&self.component, crate_dir)?;
        }
        let (bytes, mut manifest) = read_component(&self.component)?;
        for rule in &self.extra_hosts {
            let rule = HostRule::parse(rule)
                .map_err(|source| LoadError::Manifest { path: "(harness)".into(), source: source.into() })?;
            manifest.allowed_hosts.push(rule);
        }
        let granted: Vec<String> = self.config.keys().map(str::to_string).collect();
        for key in granted {
            if !manifest.config_keys.contains(&key) {
                manifest.config_keys.push(key);
            }
        }
        let settings = RuntimeSettings {
            config: self.config,
            cache_dir: self.cache_dir,
            max_instances: 8,
            ..RuntimeSettings::default()
        };
        let runtime = Runtime::new(settings).map_err(|e| LoadError::Compile(e.to_string()))?;
        let handler = runtime.load(&bytes, manifest)?;
        Ok(Harness { runtime, handler, canned: Arc::default() })
    }
}

/// A loaded handler with canned HTTP.
pub struct Harness {
    runtime: Runtime,
    handler: HandlerVersion,
    canned: Arc<Canned>,
}

impl Harness {
    /// Starts configuring a harness for the component at `path`; its manifest
    /// `<type>.toml` beside it is read when present.
    pub fn builder(path: impl AsRef<Path>) -> HarnessBuilder {
        HarnessBuilder {
            component: path.as_ref().to_path_buf(),
            config: ConfigSource::empty(),
            extra_hosts: Vec::new(),
            cache_dir: None,
            sources: None,
        }
    }

    /// Starts configuring a harness for the handler crate at `crate_dir`
    /// (pass `env!("CARGO_MANIFEST_DIR")`): its component as `cargo xtask
    /// build-handlers` placed it, `handlers-dist/<type>.wasm` at the root of
    /// its workspace. A component older than the crate's sources is refused,
    /// so a test never passes against yesterday's build.
    pub fn of_crate(crate_dir: impl AsRef<Path>) -> HarnessBuilder {
        let crate_dir = crate_dir.as_ref();
        let root = crate_dir
            .ancestors()
            .skip(1)
            .find(|dir| dir.join("Cargo.toml").is_file() && is_workspace_root(&dir.join("Cargo.toml")))
            .unwrap_or(crate_dir);
        let job_type = std::fs::read_to_string(crate_dir.join("handler.toml"))
            .ok()
            .and_then(|text| quern_runtime::manifest::Manifest::parse(&text).ok())
            .map_or_else(|| "unknown".to_string(), |manifest| manifest.job_type);
        let mut builder = Self::builder(root.join("handlers-dist").join(format!("{job_type}.wasm")))
            .cache_dir(target_dir(root).join("tmp/quern-compiled"));
        builder.sources = Some(crate_dir.to_path_buf());
        builder
    }

    /// A harness for the component at `path` with its own manifest only.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::builder(path).build()
    }

    pub fn handler(&self) -> &HandlerVersion {
        &self.handler
    }

    /// Queues a response for `METHOD url`. Several queued for one request are
    /// served in order; the last one keeps being served.
    pub fn respond(&self, method: &str, url: &str, response: CannedResponse) -> &Self {
        let key = format!("{} {url}", method.to_ascii_uppercase());
        self.canned.responses.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().push(response);
        self
    }

    /// Runs one attempt with `input` (attempt 1 of the manifest's max).
    pub async fn run(&self, input: serde_json::Value) -> HarnessRun {
        self.run_attempt(input, 1).await
    }

    /// Runs the given attempt with `input`.
    pub async fn run_attempt(&self, input: serde_json::Value, attempt: u32) -> HarnessRun {
        let first_request = self.canned.requests.lock().unwrap_or_else(|p| p.into_inner()).len();
        let progress = Arc::new(Mutex::new(Vec::new()));
        let sink = progress.clone();
        let options = RunOptions {
            progress: Some(Arc::new(move |p| sink.lock().unwrap_or_else(|e| e.into_inner()).push(p))),
            transport: Some(Transport::Canned(self.canned.clone())),
            ..RunOptions::default()
        };
        let job = JobSpec {
            id: format!("test-{}", uuid_like()),
            input: input.to_string(),
            attempt,
            max_attempts: self.handler.manifest.max_attempts,
        };
        let report = self.runtime.run(&self.handler, &job, options).await;
        let requests = self.canned.requests.lock().unwrap_or_else(|p| p.into_inner())[first_request..].to_vec();
        let progress = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        HarnessRun { outcome: report.outcome, requests, progress }
    }
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether a Cargo.toml is a workspace's root manifest.
fn is_workspace_root(manifest: &Path) -> bool {
    std::fs::read_to_string(manifest).is_ok_and(|text| text.lines().any(|line| line.trim() == "[workspace]"))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Refuses a component built before the newest of its crate's sources
/// (`Cargo.toml`, `handler.toml`, `src/**`) last changed.
fn refuse_if_stale(component: &Path, crate_dir: &Path) -> Result<(), LoadError> {
    let build = |what: &str| {
        LoadError::Layout(format!("{} {what}: build it with `cargo xtask build-handlers`", component.display()))
    };
    let built = std::fs::metadata(component).and_then(|m| m.modified()).map_err(|_| build("is not built"))?;
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut pending = vec![crate_dir.join("Cargo.toml"), crate_dir.join("handler.toml"), crate_dir.join("src")];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|entry| entry.path()));
        } else if let Ok(modified) = meta.modified()
            && newest.as_ref().is_none_or(|(time, _)| modified > *time)
        {
            newest = Some((modified, path));
        }
    }
    match newest {
        Some((changed, path)) if changed > built => Err(build(&format!(
            "is older than its sources ({} changed after it was built)",
            path.strip_prefix(crate_dir).unwrap_or(&path).display()
        ))),
        _ => Ok(()),
    }
}

//! The wasmtime side of quern: turns component bytes plus a manifest into a
//! loaded [`HandlerVersion`], and runs one job on it in a fresh sandbox.
//!
//! Built once per process: the engine, the linker (WASI + the imports of every
//! `quern:handler` world it runs, see `world`) and the outbound HTTP client.
//! Built once per handler version: the compiled component, pre-linked against
//! the world it was built for, its HTTP policy and granted configuration. Built per job: a `Store` with its WASI context, limits and
//! capability state, dropped when the job ends. This module knows nothing of
//! queues, databases or HTTP routes.
//!
//! One file over 400 lines on purpose: the path of one job through the sandbox
//! (instantiate, call, map the outcome) reads top to bottom; the capabilities
//! live in their own modules.

mod bindings;
mod compat_v0_1;
pub mod config;
pub mod engine;
pub mod http;
pub mod log;
pub mod manifest;
pub mod progress;
pub mod registry;
mod state;
mod stdio;
pub mod telemetry;
pub mod webhook;
mod world;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use wasmtime::component::Linker;
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;

use self::bindings::{Failure, Job};
use self::config::{ConfigSource, GrantedConfig};
use self::engine::{CacheOutcome, CompileCache};
use self::http::{HostRule, HttpCap, HttpPolicy, HttpSettings, OutboundHttp, Transport};
use self::log::{JobLabels, LogBudget};
use self::progress::ProgressSink;
use self::state::{JobState, MemoryLimiter};
use self::stdio::CapturedOutput;
use crate::manifest::{Limits, Manifest, ManifestError};

pub use self::engine::sha256_hex;
use self::world::{Pre, world_mismatch};
pub use self::world::{WORLD, WORLDS};

/// How much of a job's stdout and stderr is kept for the log.
const STDIO_CAP: usize = 64 << 10;

/// Process-wide runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Limits for handlers whose manifest does not set them.
    pub default_limits: Limits,
    pub http: HttpSettings,
    /// The variables the host offers handlers, and their values.
    pub config: ConfigSource,
    /// The compile cache; `None` compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// Instances alive at once (the pooling allocator reserves address space
    /// for each): at least the worker's concurrency.
    pub max_instances: u32,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            default_limits: Limits::default(),
            http: HttpSettings::default(),
            config: ConfigSource::empty(),
            cache_dir: None,
            max_instances: 100,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    #[error("cannot build the outbound HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Why a component was not loaded. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    NotAComponent(String),
    /// Names the worlds this host runs and what did not fit.
    #[error("{0}")]
    WorldMismatch(String),
    #[error("the component does not compile: {0}")]
    Compile(String),
    #[error("invalid manifest {path}: {source}")]
    Manifest { path: String, source: ManifestError },
    #[error("{0}")]
    Layout(String),
}

/// The process's wasmtime runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<JobState>,
    cache: CompileCache,
    outbound: Arc<OutboundHttp>,
    settings: RuntimeSettings,
}

/// One loaded version of one job type, ready to run jobs.
pub struct HandlerVersion {
    pub manifest: Manifest,
    /// The version id: the short sha256 of the component's sha256 and the
    /// manifest's text.
    pub version: Arc<str>,
    pub sha256: String,
    pub limits: Limits,
    /// How the component was obtained and how long loading took.
    pub load: (CacheOutcome, Duration),
    pre: Pre,
    policy: Arc<HttpPolicy>,
    config: Arc<GrantedConfig>,
    job_type: Arc<str>,
}

impl HandlerVersion {
    /// The world the component was built against (e.g.
    /// `quern:handler/handler@0.2.0`).
    pub fn world(&self) -> &'static str {
        self.pre.world()
    }

    /// This version under the id it is known by elsewhere (stored and rolled
    /// out before the way ids are computed changed).
    pub fn named(self, version: &str) -> Self {
        Self { version: Arc::from(version), ..self }
    }
}

impl std::fmt::Debug for HandlerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerVersion").field("job_type", &self.job_type).field("version", &self.version).finish()
    }
}

/// One attempt of one job, as the runtime sees it.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: String,
    /// The job's input: JSON text.
    pub input: String,
    pub attempt: u32,
    pub max_attempts: u32,
}

/// What a caller may add to one run.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Cancelling it interrupts the running job (it ends [`Outcome::Cancelled`]).
    pub cancel: CancellationToken,
    pub progress: Option<ProgressSink>,
    /// Replaces the network, e.g. with canned responses in tests.
    pub transport: Option<Transport>,
}

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler's result: JSON text.
    Completed {
        output: String,
    },
    /// A transient failure: run again later, no sooner than `delay` if set.
    Retry {
        reason: String,
        delay: Option<Duration>,
    },
    /// A permanent failure: the handler's, or a limit it broke.
    Failed {
        reason: String,
    },
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    /// The handler version the attempt ran on.
    pub version: Arc<str>,
    pub elapsed: Duration,
}

impl Runtime {
    pub fn new(settings: RuntimeSettings) -> Result<Self, RuntimeError> {
        let engine = engine::new_engine(settings.max_instances).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        engine::start_epoch_ticker(&engine);
        let mut linker = Linker::new(&engine);
        world::add_to_linker(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let outbound = Arc::new(OutboundHttp::new(settings.http.clone())?);
        let cache = CompileCache::new(settings.cache_dir.clone());
        Ok(Self { engine, linker, cache, outbound, settings })
    }

    pub fn settings(&self) -> &RuntimeSettings {
        &self.settings
    }

    /// Compiles (or loads from the cache), links and checks a component
    /// against the world. Slow on a cache miss: keep it off the job path.
    pub fn load(&self, bytes: &[u8], mut manifest: Manifest) -> Result<HandlerVersion, LoadError> {
        check_component_header(bytes)?;
        manifest.allowed_hosts.extend(self.hosts_from_settings(&manifest)?);
        let undeclared = self.settings.config.undeclared(&manifest.config_keys);
        if !undeclared.is_empty() {
            tracing::warn!(
                job_type = %manifest.job_type,
                variables = %config::list(&undeclared),
                hint = "offer them with QUERN_VAR_<NAME>, the handler config file (QUERN_HANDLER_CONFIG) or QUERN_HANDLER_ENV",
                "the handler reads variables this host does not offer; they read as absent"
            );
        }
        let started = Instant::now();
        let sha256 = sha256_hex(bytes);
        let (component, cache_outcome) =
            self.cache.load(&self.engine, bytes, &sha256).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(world_mismatch)?;
        let pre = Pre::new(instance_pre)?;

        let policy = Arc::new(HttpPolicy::new(&manifest.job_type, manifest.allowed_hosts.clone()));
        self.outbound.grant_exact_names(&policy);
        // A version is its component and its manifest: the same build under
        // another policy (fewer hosts, smaller limits) is another version,
        // so a policy change can never be mistaken for one already stored.
        let version = sha256_hex(format!("{sha256}\n{}", manifest.source).as_bytes());
        Ok(HandlerVersion {
            version: Arc::from(&version[..12]),
            limits: self.settings.default_limits.with(manifest.limits),
            config: Arc::new(self.settings.config.grant(&manifest.config_keys)),
            job_type: Arc::from(manifest.job_type.as_str()),
            load: (cache_outcome, started.elapsed()),
            manifest,
            sha256,
            pre,
            policy,
        })
    }

    /// The host rules a manifest takes from settings: the host and port of
    /// the URL each holds (an unset setting grants nothing). A value is
    /// never echoed: it may be a secret set under the wrong name.
    fn hosts_from_settings(&self, manifest: &Manifest) -> Result<Vec<HostRule>, LoadError> {
        let mut rules = Vec::new();
        for key in &manifest.host_settings {
            let Some(value) = self.settings.config.get(key) else { continue };
            let invalid = |reason: &str| LoadError::Manifest {
                path: format!("{} (allowed host {{{{ {key} }}}})", manifest.job_type),
                source: crate::manifest::ManifestError::HostRule {
                    rule: format!("{{{{ {key} }}}}"),
                    reason: format!("the setting {key} {reason}"),
                },
            };
            let url =
                url::Url::parse(value.trim()).map_err(|_| invalid("is not a URL (e.g. https://api.example.com/v1)"))?;
            let host = url.host_str().ok_or_else(|| invalid("is a URL without a host"))?;
            let rule = match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            };
            rules.push(HostRule::parse(&rule).map_err(|_| invalid("names a host that is not a valid rule"))?);
        }
        Ok(rules)
    }

    /// Deletes the compiled artifacts of every component but those in
    /// `keep` (by sha256) from the compile cache, sparing those written
    /// within `grace`; returns how many.
    pub fn evict_compiled(&self, keep: &HashSet<String>, grace: Duration) -> std::io::Result<usize> {
        self.cache.evict_except(&self.engine, keep, grace)
    }

    /// Runs one attempt of `job` on `handler` in a fresh instance.
    pub async fn run(&self, handler: &HandlerVersion, job: &JobSpec, options: RunOptions) -> RunReport {
        let started = Instant::now();
        let labels = JobLabels {
            job_id: Arc::from(job.id.as_str()),
            job_type: handler.job_type.clone(),
            version: handler.version.clone(),
        };
        let stdout = CapturedOutput::new(STDIO_CAP);
        let stderr = CapturedOutput::new(STDIO_CAP);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = JobState {
            wasi,
            table: Default::default(),
            limiter: MemoryLimiter { max_bytes: handler.limits.memory_bytes, hit: false },
            http: HttpCap {
                policy: handler.policy.clone(),
                transport: options.transport.clone().unwrap_or_else(|| Transport::Network(self.outbound.clone())),
            },
            config: handler.config.clone(),
            labels: labels.clone(),
            log_budget: LogBudget::default(),
            progress: options.progress.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Yield to the executor at every epoch tick, so the deadline and cancel
        // below can interrupt a guest that never calls the host.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let deadline = handler.limits.deadline;
        let wit_job = Job {
            id: job.id.clone(),
            job_type: handler.manifest.job_type.clone(),
            input: job.input.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            deadline_unix_ms: unix_ms(SystemTime::now() + deadline),
        };
        let call = handler.pre.call(&mut store, &wit_job);
        let ended = tokio::select! {
            biased;
            () = options.cancel.cancelled() => Ended::Cancelled,
            () = tokio::time::sleep(deadline) => Ended::Deadline,
            result = call => Ended::Returned(result),
        };

        let (stderr_bytes, _) = stderr.take();
        let stderr_text = String::from_utf8_lossy(&stderr_bytes);
        let outcome = match ended {
            Ended::Cancelled => Outcome::Cancelled,
            Ended::Deadline => Outcome::Failed { reason: format!("exceeded deadline of {}", human_duration(deadline)) },
            Ended::Returned(Ok(Ok(output))) => check_output(output, handler.limits.output_bytes),
            Ended::Returned(Ok(Err(Failure::Fail(reason)))) => Outcome::Failed { reason },
            Ended::Returned(Ok(Err(Failure::Retry(retry)))) => {
                Outcome::Retry { reason: retry.reason, delay: retry.delay_ms.map(Duration::from_millis) }
            }
            Ended::Returned(Err(error)) => classify_error(&error, &store.data().limiter, &stderr_text),
        };
        let budget = &mut store.data_mut().log_budget;
        log_stdio(&labels, budget, "stdout", stdout.take());
        log_stdio(&labels, budget, "stderr", (stderr_bytes.clone(), 0));
        budget.report(&labels);
        metrics::histogram!(crate::telemetry::INSTANCE_TIME, "type" => labels.job_type.to_string())
            .record(started.elapsed().as_secs_f64());
        RunReport { outcome, version: handler.version.clone(), elapsed: started.elapsed() }
    }
}

enum Ended {
    Cancelled,
    Deadline,
    Returned(wasmtime::Result<Result<String, Failure>>),
}

/// Tells a component from a core module or from something else entirely,
/// before the compiler gives a less helpful message.
fn check_component_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    const COMPONENT_LAYER: [u8; 2] = [1, 0];
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotAComponent(
            "not a WebAssembly file: it does not start with the `\\0asm` magic bytes".into(),
        ));
    }
    if bytes[6..8] != COMPONENT_LAYER {
        return Err(LoadError::NotAComponent(
            "a core WebAssembly module, not a component: build it with `cargo build --target wasm32-wasip2` or `cargo component build`".into(),
        ));
    }
    Ok(())
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

fn check_output(output: String, max_bytes: usize) -> Outcome {
    if output.len() > max_bytes {
        return Outcome::Failed {
            reason: format!(
                "result of {} bytes exceeds the output limit of {}",
                output.len(),
                http::human_bytes(max_bytes)
            ),
        };
    }
    match serde_json::from_str::<serde::de::IgnoredAny>(&output) {
        Ok(_) => Outcome::Completed { output },
        Err(error) => Outcome::Failed { reason: format!("the handler returned a result that is not JSON: {error}") },
    }
}

/// Names the cause of a trap. A trap the guest caused is permanent; an error
/// that is not a guest trap (say, no free instance slot) is the host's, and
/// worth another attempt.
fn classify_error(error: &wasmtime::Error, limiter: &MemoryLimiter, stderr: &str) -> Outcome {
    let failed = |reason: String| Outcome::Failed { reason };
    if limiter.hit {
        return failed(format!("exceeded memory limit of {}", http::human_bytes(limiter.max_bytes)));
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return failed(format!("the handler exited with status {} instead of returning a result", exit.0));
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => failed("stack overflow: the handler exhausted its call stack".into()),
        // Rust and C keep their stack in linear memory below the data; when
        // recursion runs it past address 0 the access wraps out of bounds.
        Some(Trap::MemoryOutOfBounds) => failed(
            "stack overflow or out-of-bounds memory access: the handler touched memory outside its heap \
             (in safe Rust, recursion too deep for its stack)"
                .into(),
        ),
        Some(Trap::UnreachableCodeReached) => match panic_message(stderr) {
            Some(panic) => failed(format!("the handler panicked: {panic}")),
            None => failed("the handler trapped: unreachable code reached (an abort)".into()),
        },
        Some(trap) => failed(format!("the handler trapped: {trap}")),
        None => Outcome::Retry { reason: format!("host error: {error:#}"), delay: None },
    }
}

/// The message of a Rust panic, from the default hook's lines on stderr:
/// `thread '…' panicked at src/lib.rs:9:5:` then the message.
fn panic_message(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines().skip_while(|line| !line.contains(" panicked at "));
    let header = lines.next()?;
    let location = header.split(" panicked at ").nth(1).unwrap_or("").trim_end_matches(':');
    let message: Vec<&str> = lines.take_while(|line| !line.starts_with("note: ")).collect();
    Some(format!("{} (at {location})", message.join(" ").trim()))
}

fn log_stdio(labels: &JobLabels, budget: &mut LogBudget, stream: &'static str, (bytes, dropped): (Vec<u8>, usize)) {
    if bytes.is_empty() {
        return;
    }
    let (job_id, job_type, version) = (&*labels.job_id, &*labels.job_type, &*labels.version);
    for line in String::from_utf8_lossy(&bytes).lines().filter(|line| !line.is_empty()) {
        if budget.admit(line.len()) {
            tracing::info!(target: "handler", job_id, job_type, version, stream, "{line}");
        }
    }
    if dropped > 0 {
        tracing::warn!(target: "handler", job_id, job_type, version, stream, dropped, "output past the capture cap was dropped");
    }
}

pub(crate) fn human_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_is_read_from_the_default_hook() {
        let stderr = "thread '<unnamed>' panicked at src/lib.rs:70:34:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(panic_message(stderr).as_deref(), Some("boom (at src/lib.rs:70:34)"));
        assert_eq!(panic_message("nothing here"), None);
    }

    #[test]
    fn headers_tell_modules_from_components() {
        let core = b"\0asm\x01\0\0\0";
        let component = b"\0asm\x0d\0\x01\0";
        assert!(matches!(check_component_header(core), Err(LoadError::NotAComponent(m)) if m.contains("core")));
        assert!(matches!(check_component_header(b"PK\x03\x04zip!"), Err(LoadError::NotAComponent(_))));
        assert!(check_component_header(component).is_ok());
    }

    #[test]
    fn oversized_or_non_json_output_fails() {
        assert!(matches!(check_output("{\"a\":1}".into(), 1024), Outcome::Completed { .. }));
        assert!(matches!(check_output("x".repeat(2048), 1024), Outcome::Failed { reason } if reason.contains("1 KiB")));
        assert!(
            matches!(check_output("not json".into(), 1024), Outcome::Failed { reason } if reason.contains("not JSON"))
        );
    }
}

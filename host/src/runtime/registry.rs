//! The active handler version of each job type, swapped atomically.
//!
//! A handlers directory holds `<type>.wasm` + `<type>.toml` pairs. The registry
//! loads them at start and, when watched, reloads a pair when either file
//! changes: the new version is compiled and checked off the job path, then
//! swapped in. A job holds an `Arc` of the version it started on, so it
//! finishes on that version whatever is swapped in meanwhile. A file that does
//! not load is reported and the previous version keeps serving; a deleted file
//! unloads nothing (a handler disappears only by restarting without it).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::sync::broadcast;

use super::{HandlerVersion, LoadError, Runtime};
use crate::manifest::{Manifest, validate_job_type};

/// What happened to a handler file, for logs, tests and (later) metrics.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    Installed { job_type: String, version: Arc<str> },
    Rejected { path: PathBuf, error: String },
}

pub struct Registry {
    runtime: Arc<Runtime>,
    active: ArcSwap<HashMap<String, Arc<HandlerVersion>>>,
    events: broadcast::Sender<RegistryEvent>,
}

/// What loading a directory did, file by file.
pub type LoadResults = Vec<(PathBuf, Result<Arc<HandlerVersion>, LoadError>)>;

/// Keeps a directory watch alive; dropping it stops the watch.
pub struct DirWatch {
    _debouncer: Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>,
}

impl Registry {
    pub fn new(runtime: Arc<Runtime>) -> Arc<Self> {
        let (events, _) = broadcast::channel(64);
        Arc::new(Self { runtime, active: ArcSwap::default(), events })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The active version of a job type.
    pub fn get(&self, job_type: &str) -> Option<Arc<HandlerVersion>> {
        self.active.load().get(job_type).cloned()
    }

    /// Every active version, by job type.
    pub fn all(&self) -> Vec<Arc<HandlerVersion>> {
        let mut all: Vec<_> = self.active.load().values().cloned().collect();
        all.sort_by(|a, b| a.manifest.job_type.cmp(&b.manifest.job_type));
        all
    }

    /// The job types with an active version.
    pub fn job_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.active.load().keys().cloned().collect();
        types.sort();
        types
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    /// Makes `handler` the active version of its type.
    pub fn install(&self, handler: HandlerVersion) -> Arc<HandlerVersion> {
        let handler = Arc::new(handler);
        let job_type = handler.manifest.job_type.clone();
        self.active.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(job_type.clone(), handler.clone());
            next
        });
        tracing::info!(job_type = %job_type, version = %handler.version, "handler version active");
        let _ = self.events.send(RegistryEvent::Installed { job_type, version: handler.version.clone() });
        handler
    }

    /// Loads `<type>.wasm` with its `<type>.toml` and makes it active.
    pub fn load_file(&self, wasm_path: &Path) -> Result<Arc<HandlerVersion>, LoadError> {
        let (bytes, manifest) = read_handler_pair(wasm_path)?;
        let handler = self.runtime.load(&bytes, manifest)?;
        Ok(self.install(handler))
    }

    /// Loads every pair in `dir`. A pair that does not load is reported and
    /// skipped; the others still load.
    pub fn load_dir(&self, dir: &Path) -> Result<LoadResults, LoadError> {
        let entries =
            std::fs::read_dir(dir).map_err(|source| LoadError::Read { path: dir.display().to_string(), source })?;
        let mut wasm_files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| handler_stem(path).is_some_and(|(_, ext)| ext == "wasm"))
            .collect();
        wasm_files.sort();
        Ok(wasm_files
            .into_iter()
            .map(|path| {
                let result = self.load_file(&path);
                if let Err(error) = &result {
                    self.reject(&path, error);
                }
                (path, result)
            })
            .collect())
    }

    /// Reloads a pair whenever one of its files in `dir` changes.
    pub fn watch(self: &Arc<Self>, dir: &Path) -> Result<DirWatch, notify_debouncer_mini::notify::Error> {
        let registry = Arc::downgrade(self);
        let watched_dir = dir.to_path_buf();
        let mut debouncer = new_debouncer(Duration::from_millis(100), move |result: DebounceEventResult| {
            let Some(registry) = registry.upgrade() else { return };
            match result {
                Ok(events) => {
                    let stems: BTreeSet<String> =
                        events.iter().filter_map(|event| handler_stem(&event.path).map(|(stem, _)| stem)).collect();
                    for stem in stems {
                        registry.reload(&watched_dir.join(format!("{stem}.wasm")));
                    }
                }
                Err(error) => tracing::error!(%error, "watching the handlers directory failed"),
            }
        })?;
        debouncer.watcher().watch(dir, RecursiveMode::NonRecursive)?;
        Ok(DirWatch { _debouncer: debouncer })
    }

    fn reload(&self, wasm_path: &Path) {
        if !wasm_path.exists() {
            tracing::warn!(path = %wasm_path.display(), "handler file removed; its loaded version keeps serving until restart");
            return;
        }
        if let Err(error) = self.load_file(wasm_path) {
            self.reject(wasm_path, &error);
        }
    }

    fn reject(&self, path: &Path, error: &LoadError) {
        tracing::error!(path = %path.display(), %error, "handler rejected; the previous version, if any, keeps serving");
        let _ = self.events.send(RegistryEvent::Rejected { path: path.to_path_buf(), error: error.to_string() });
    }
}

/// `(stem, extension)` of a handler file: `echo.wasm` → `("echo", "wasm")`.
/// Other files (editor swaps, `.tmp` files of an atomic copy) are not handler files.
fn handler_stem(path: &Path) -> Option<(String, String)> {
    let extension = path.extension()?.to_str()?;
    if extension != "wasm" && extension != "toml" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    validate_job_type(stem).ok()?;
    Some((stem.to_string(), extension.to_string()))
}

/// Reads `<type>.wasm` and its manifest `<type>.toml`, which must declare that type.
pub fn read_handler_pair(wasm_path: &Path) -> Result<(Vec<u8>, Manifest), LoadError> {
    let read_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| LoadError::Read { path, source }
    };
    let bytes = std::fs::read(wasm_path).map_err(read_error(wasm_path))?;
    let manifest_path = wasm_path.with_extension("toml");
    let text = std::fs::read_to_string(&manifest_path).map_err(read_error(&manifest_path))?;
    let manifest = Manifest::parse(&text)
        .map_err(|source| LoadError::Manifest { path: manifest_path.display().to_string(), source })?;
    let stem = wasm_path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if manifest.job_type != stem {
        return Err(LoadError::Layout(format!(
            "{} declares type `{}` but is named for `{stem}`: name the pair {}.wasm and {}.toml",
            manifest_path.display(),
            manifest.job_type,
            manifest.job_type,
            manifest.job_type
        )));
    }
    Ok((bytes, manifest))
}

/// A component and its manifest: `<type>.toml` beside it when there is one, a
/// bare manifest named for the file otherwise (for running a component alone).
pub fn read_component(path: &Path) -> Result<(Vec<u8>, Manifest), LoadError> {
    if path.with_extension("toml").exists() {
        return read_handler_pair(path);
    }
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: format!("{} (build the handlers first: cargo xtask build-handlers)", path.display()),
        source,
    })?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("handler");
    let job_type = if validate_job_type(stem).is_ok() { stem } else { "handler" };
    Ok((bytes, Manifest::bare(job_type)))
}

//! The active handler version of each job type, swapped atomically.
//!
//! A handlers directory holds `<type>.wasm` + `<type>.toml` pairs. The registry
//! loads them at start and, when watched, reloads a pair when either file's
//! content changes (writes, renames, removals; never reads, which a backup,
//! `cat` or `quern run` beside a server make): the new version is compiled and
//! checked off the job path, then swapped in. A job holds an `Arc` of the
//! version it started on, so it finishes on that version whatever is swapped in meanwhile. A file that does
//! not load is reported and the previous version keeps serving; a deleted file
//! unloads nothing (a handler disappears only by restarting without it).
//!
//! Types rolled out through the API are *managed*: their active version, a
//! canary taking a share of jobs, and a pause flag come from the database
//! (see `queue::versions`), and the directory no longer decides for them.
//! [`Registry::pick`] chooses a job's version by a stable hash of its id, so
//! a canary split is the same for the same jobs wherever they run.
//!
//! One file over 400 lines on purpose: loading, watching and swapping share the
//! registry's atomic maps and must be read together to see that a job never
//! loses its version.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{HandlerVersion, LoadError, Runtime};
use crate::manifest::{Manifest, validate_job_type};

/// What happened to a handler file, for logs, tests and (later) metrics.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    Installed {
        job_type: String,
        version: Arc<str>,
    },
    Rejected {
        path: PathBuf,
        error: String,
    },
    /// A watched pair was written but its content is what was loaded already.
    Unchanged {
        job_type: String,
    },
}

pub struct Registry {
    runtime: Arc<Runtime>,
    active: ArcSwap<HashMap<String, Arc<HandlerVersion>>>,
    canaries: ArcSwap<HashMap<String, Canary>>,
    /// Types whose versions come from the database, not the directory.
    managed: ArcSwap<BTreeSet<String>>,
    /// Types neither enqueued nor claimed for now.
    paused: ArcSwap<BTreeSet<String>>,
    /// The content hash of each type's pair as last read from the directory,
    /// so a write that changes nothing (a `touch`, the same build copied
    /// again) reloads nothing.
    dir_content: Mutex<HashMap<String, DirectoryLoad>>,
    events: broadcast::Sender<RegistryEvent>,
}

/// A version taking `percent` of a type's new jobs.
#[derive(Debug, Clone)]
pub struct Canary {
    pub version: Arc<HandlerVersion>,
    pub percent: u8,
}

/// A job's place in 0..100 for canary splits: a stable hash of its id.
pub fn canary_bucket(job_id: &Uuid) -> u8 {
    let digest = Sha256::digest(job_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 100) as u8
}

/// What loading a directory did, file by file.
pub type LoadResults = Vec<(PathBuf, Result<Arc<HandlerVersion>, LoadError>)>;

/// Keeps a directory watch alive; dropping it stops the watch (and its thread).
pub struct DirWatch {
    _watcher: RecommendedWatcher,
}

/// How long the directory must be quiet before a burst of writes (a copy
/// arrives as many) is acted on.
const QUIET: Duration = Duration::from_millis(100);

impl Registry {
    pub fn new(runtime: Arc<Runtime>) -> Arc<Self> {
        let (events, _) = broadcast::channel(64);
        Arc::new(Self {
            runtime,
            active: ArcSwap::default(),
            canaries: ArcSwap::default(),
            managed: ArcSwap::default(),
            paused: ArcSwap::default(),
            dir_content: Mutex::default(),
            events,
        })
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

    /// The types a worker may claim: loaded and not paused.
    pub fn claimable_types(&self) -> Vec<String> {
        let paused = self.paused.load();
        self.job_types().into_iter().filter(|t| !paused.contains(t)).collect()
    }

    /// The version a job runs on: the canary when the job's bucket falls in
    /// its share, the active version otherwise.
    pub fn pick(&self, job_type: &str, job_id: &Uuid) -> Option<Arc<HandlerVersion>> {
        if let Some(canary) = self.canaries.load().get(job_type)
            && canary_bucket(job_id) < canary.percent
        {
            return Some(canary.version.clone());
        }
        self.get(job_type)
    }

    /// The sha256 of every component serving now: active and canary versions.
    pub fn serving_sha256s(&self) -> Vec<String> {
        let active = self.active.load().values().map(|h| h.sha256.clone()).collect::<Vec<_>>();
        let canaries = self.canaries.load().values().map(|c| c.version.sha256.clone()).collect::<Vec<_>>();
        active.into_iter().chain(canaries).collect()
    }

    pub fn canary(&self, job_type: &str) -> Option<Canary> {
        self.canaries.load().get(job_type).cloned()
    }

    pub fn is_paused(&self, job_type: &str) -> bool {
        self.paused.load().contains(job_type)
    }

    pub fn set_paused(&self, paused: BTreeSet<String>) {
        self.paused.store(Arc::new(paused));
    }

    pub fn is_managed(&self, job_type: &str) -> bool {
        self.managed.load().contains(job_type)
    }

    /// Makes `active` (and `canary`, if any) serve a type from now on, which
    /// the directory then no longer decides for.
    pub fn apply_rollout(&self, active: Arc<HandlerVersion>, canary: Option<Canary>) {
        let job_type = active.manifest.job_type.clone();
        self.managed.rcu(|current| {
            let mut next = BTreeSet::clone(current);
            next.insert(job_type.clone());
            next
        });
        if self.get(&job_type).is_none_or(|current| current.sha256 != active.sha256) {
            self.install_shared(active);
        }
        self.canaries.rcu(|current| {
            let mut next = HashMap::clone(current);
            match &canary {
                Some(canary) => next.insert(job_type.clone(), canary.clone()),
                None => next.remove(&job_type),
            };
            next
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    /// Makes `handler` the active version of its type.
    pub fn install(&self, handler: HandlerVersion) -> Arc<HandlerVersion> {
        self.install_shared(Arc::new(handler))
    }

    fn install_shared(&self, handler: Arc<HandlerVersion>) -> Arc<HandlerVersion> {
        let job_type = handler.manifest.job_type.clone();
        self.active.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(job_type.clone(), handler.clone());
            next
        });
        tracing::info!(job_type = %job_type, version = %handler.version, world = handler.world(), "handler version active");
        let _ = self.events.send(RegistryEvent::Installed { job_type, version: handler.version.clone() });
        handler
    }

    /// The type, other than `job_type`, whose active version claims the
    /// legacy function `function` (one route, one type).
    pub fn function_claimant(&self, function: &str, job_type: &str) -> Option<String> {
        self.active
            .load()
            .values()
            .find(|h| h.manifest.job_type != job_type && h.manifest.function.as_deref() == Some(function))
            .map(|h| h.manifest.job_type.clone())
    }

    /// Loads `<type>.wasm` with its `<type>.toml` and makes it active.
    pub fn load_file(&self, wasm_path: &Path) -> Result<Arc<HandlerVersion>, LoadError> {
        let (bytes, manifest) = read_handler_pair(wasm_path)?;
        self.load_read(wasm_path, bytes, manifest)
    }

    /// Loads a pair already read from `wasm_path`, remembering what it held.
    fn load_read(
        &self,
        wasm_path: &Path,
        bytes: Vec<u8>,
        manifest: Manifest,
    ) -> Result<Arc<HandlerVersion>, LoadError> {
        let content = pair_content_hash(&bytes, &manifest);
        let job_type = manifest.job_type.clone();
        if let Some(function) = &manifest.function
            && let Some(other) = self.function_claimant(function, &job_type)
        {
            return Err(LoadError::Layout(format!(
                "{}: function = \"{function}\" is already claimed by type `{other}`: one legacy function, one type",
                wasm_path.display()
            )));
        }
        let version = self.load_pair(wasm_path, bytes, manifest)?;
        let load = DirectoryLoad { path: wasm_path.to_path_buf(), content, version: version.version.clone() };
        self.dir_content.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(job_type, load);
        Ok(version)
    }

    /// Whether `content` is what the type's pair held when it last loaded.
    fn is_loaded_content(&self, job_type: &str, content: &str) -> bool {
        let loaded = self.dir_content.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loaded.get(job_type).is_some_and(|load| load.content == content)
    }

    /// The build of a type serving from the handlers directory, as its files
    /// hold it now: the component's bytes and the manifest's text, with the
    /// version they loaded as. `None` when the type is rolled out through the
    /// API, or its files changed since they loaded (a reload is on its way).
    pub fn directory_build(&self, job_type: &str) -> Option<(Arc<HandlerVersion>, Vec<u8>)> {
        if self.is_managed(job_type) {
            return None;
        }
        let active = self.get(job_type)?;
        let load = self.dir_content.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(job_type).cloned()?;
        if load.version != active.version {
            return None;
        }
        let (bytes, manifest) = read_handler_pair(&load.path).ok()?;
        (pair_content_hash(&bytes, &manifest) == load.content).then_some((active, bytes))
    }

    fn load_pair(
        &self,
        wasm_path: &Path,
        bytes: Vec<u8>,
        manifest: Manifest,
    ) -> Result<Arc<HandlerVersion>, LoadError> {
        if self.is_managed(&manifest.job_type) {
            return Err(LoadError::Layout(format!(
                "type `{}` is rolled out through the API (quern handlers push); {} is ignored",
                manifest.job_type,
                wasm_path.display()
            )));
        }
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

    /// Reloads a pair whenever one of its files in `dir` is written,
    /// renamed or removed, and its content differs from what was loaded.
    pub fn watch(self: &Arc<Self>, dir: &Path) -> Result<DirWatch, notify::Error> {
        let (changed, changes) = mpsc::channel::<PathBuf>();
        let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
            Ok(event) if changes_content(&event.kind) => {
                for path in event.paths {
                    let _ = changed.send(path);
                }
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "watching the handlers directory failed"),
        })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let registry = Arc::downgrade(self);
        let watched_dir = dir.to_path_buf();
        // Ends when the watcher (the only sender) is dropped.
        std::thread::Builder::new()
            .name("quern-handler-watch".into())
            .spawn(move || {
                while let Ok(first) = changes.recv() {
                    let mut stems = BTreeSet::new();
                    stems.extend(handler_stem(&first).map(|(stem, _)| stem));
                    while let Ok(path) = changes.recv_timeout(QUIET) {
                        stems.extend(handler_stem(&path).map(|(stem, _)| stem));
                    }
                    let Some(registry) = registry.upgrade() else { return };
                    for stem in stems {
                        registry.reload(&watched_dir.join(format!("{stem}.wasm")));
                    }
                }
            })
            .map_err(notify::Error::io)?;
        Ok(DirWatch { _watcher: watcher })
    }

    fn reload(&self, wasm_path: &Path) {
        if !wasm_path.exists() {
            tracing::warn!(path = %wasm_path.display(), "handler file removed; its loaded version keeps serving until restart");
            return;
        }
        let loaded = read_handler_pair(wasm_path).and_then(|(bytes, manifest)| {
            if self.is_loaded_content(&manifest.job_type, &pair_content_hash(&bytes, &manifest)) {
                tracing::debug!(path = %wasm_path.display(), "handler file written with the content already loaded");
                let _ = self.events.send(RegistryEvent::Unchanged { job_type: manifest.job_type });
                return Ok(());
            }
            self.load_read(wasm_path, bytes, manifest).map(drop)
        });
        if let Err(error) = loaded {
            self.reject(wasm_path, &error);
        }
    }

    fn reject(&self, path: &Path, error: &LoadError) {
        tracing::error!(path = %path.display(), %error, "handler rejected; the previous version, if any, keeps serving");
        let _ = self.events.send(RegistryEvent::Rejected { path: path.to_path_buf(), error: error.to_string() });
    }
}

/// A pair loaded from the handlers directory: where, what it held, and the
/// version it became.
#[derive(Debug, Clone)]
struct DirectoryLoad {
    path: PathBuf,
    content: String,
    version: Arc<str>,
}

/// What a pair holds: the component's bytes and the manifest's text.
fn pair_content_hash(bytes: &[u8], manifest: &Manifest) -> String {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    hasher.update(manifest.source.as_bytes());
    hex::encode(hasher.finalize())
}

/// Whether an event can have changed a file's content. Opening, reading and
/// closing a file unwritten are not; neither is a change of its metadata.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_buckets_split_a_thousand_ids_near_their_share_and_never_change() {
        let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
        let in_ten = ids.iter().filter(|id| canary_bucket(id) < 10).count();
        assert!((50..=150).contains(&in_ten), "{in_ten} of 1000 in a 10 % canary");
        let again = ids.iter().filter(|id| canary_bucket(id) < 10).count();
        assert_eq!(in_ten, again);
        assert!(ids.iter().all(|id| canary_bucket(id) < 100));
    }
}

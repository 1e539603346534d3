//! The one wasmtime `Engine` of a process, its epoch ticker, and the on-disk
//! cache of compiled components.
//!
//! The engine uses the pooling allocator (instance slots reused, copy-on-write
//! heap images, memory kept resident between jobs) because a fresh instance
//! per job is the hot path, and epoch interruption so a running guest can be
//! stopped at a deadline or on cancel.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::manifest::MAX_MEMORY_MB;

/// How often the epoch advances: a running guest yields at each tick, so this
/// bounds how late a deadline or a cancel takes effect.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// An engine with room for `max_instances` instances alive at once.
pub fn new_engine(max_instances: u32) -> wasmtime::Result<Engine> {
    let max_instances = max_instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(max_instances)
        // A Rust component holds a few core instances (the program and its shims).
        .total_core_instances(max_instances * 4)
        .total_tables(max_instances * 4)
        .total_memories(max_instances)
        .total_stacks(max_instances)
        .max_memory_size((MAX_MEMORY_MB as usize) << 20)
        // Reset used slots with memset rather than madvise, and find the
        // dirtied pages with PAGEMAP_SCAN where the kernel has it: this is
        // what makes a fresh instance per job cost microseconds.
        .linear_memory_keep_resident(16 << 20)
        .table_keep_resident(1 << 20)
        .pagemap_scan(Enabled::Auto);

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new().name("quern-epoch".into()).spawn(move || {
        while let Some(engine) = weak.upgrade() {
            engine.increment_epoch();
            drop(engine);
            std::thread::sleep(EPOCH_TICK);
        }
    });
    if let Err(error) = spawned {
        // Without a ticker no deadline fires; refusing to run is safer.
        panic!("cannot start the epoch ticker thread: {error}");
    }
}

/// Compiled components on local disk, keyed by the sha256 of the component
/// and the engine's configuration, so a restart or a second load of the same
/// bytes does not compile again.
///
/// Loading native code is only as safe as the directory: it must be private to
/// quern (it is created mode 0700), and only files this cache wrote are read.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Compiled,
    Loaded,
}

impl CompileCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The component for `bytes`, from the cache when it is there.
    pub fn load(&self, engine: &Engine, bytes: &[u8], sha256: &str) -> wasmtime::Result<(Component, CacheOutcome)> {
        let Some(path) = self.path_for(engine, sha256) else {
            return Ok((Component::new(engine, bytes)?, CacheOutcome::Compiled));
        };
        if path.exists() {
            // SAFETY: the file was written by `store` below from
            // `Component::serialize` with this engine's configuration (the
            // name carries its hash), in a directory only quern writes.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => return Ok((component, CacheOutcome::Loaded)),
                Err(error) => tracing::warn!(path = %path.display(), %error, "ignoring an unusable compiled artifact"),
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(error) = store(&path, &component.serialize()?) {
            tracing::warn!(path = %path.display(), %error, "cannot write the compile cache; continuing without it");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    /// Deletes every compiled artifact written more than `grace` ago but
    /// those of the components in `keep` (by sha256) for this engine:
    /// artifacts of versions no longer stored, and those an older build of
    /// quern wrote. The grace spares what another process sharing the
    /// directory has just compiled. Returns how many.
    pub fn evict_except(&self, engine: &Engine, keep: &HashSet<String>, grace: Duration) -> std::io::Result<usize> {
        let Some(dir) = &self.dir else { return Ok(0) };
        let kept: HashSet<PathBuf> = keep.iter().filter_map(|sha256| self.path_for(engine, sha256)).collect();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(error),
        };
        let mut evicted = 0;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let young = entry.metadata()?.modified()?.elapsed().is_ok_and(|age| age < grace);
            if path.extension().is_some_and(|ext| ext == "cwasm") && !kept.contains(&path) && !young {
                match std::fs::remove_file(&path) {
                    Ok(()) => evicted += 1,
                    // Another process sharing the directory got there first.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(evicted)
    }

    fn path_for(&self, engine: &Engine, sha256: &str) -> Option<PathBuf> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Some(self.dir.as_ref()?.join(format!("{sha256}-{:016x}.cwasm", hasher.finish())))
    }
}

/// Writes atomically: a reader sees the old file, no file, or the whole new one.
fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let mut temp = tempfile_in(dir)?;
    std::io::Write::write_all(&mut temp.1, bytes)?;
    temp.1.sync_all()?;
    std::fs::rename(&temp.0, path)
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = format!(".tmp-{}-{:x}", std::process::id(), rand::random::<u64>());
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    Ok((path, file))
}

pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

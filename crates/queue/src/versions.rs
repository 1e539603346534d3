//! Handler versions from the database, brought into this process's registry.
//!
//! Every worker and gateway runs a [`VersionSync`]: it reads the rollouts at
//! start, again whenever one changes (NOTIFY `quern_handlers` on PostgreSQL,
//! in-process on SQLite) and every few seconds in case a notice was missed.
//! A version is fetched and compiled once per process; the runtime's compile
//! cache keeps the native artifact on local disk, so a restart or a second
//! process on the machine loads it in a fraction of a millisecond.
//!
//! The same loop judges canaries whose build asks for it (`[rollout]
//! auto_rollback` in its manifest): one that fails more than the active
//! version by its margin, over at least its number of jobs, is rolled back.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::telemetry::CANARY_ROLLBACKS;
use crate::{rollout, stats};
use quern_runtime::manifest::{Manifest, ManifestError};
use quern_runtime::registry::{Canary, Registry};
use quern_runtime::{HandlerVersion, LoadError};
use quern_store::{Store, StoreError};

/// How often rollouts are read when no notice comes.
const POLL: Duration = Duration::from_secs(3);
/// How often compiled artifacts of versions no longer stored are deleted.
const EVICT_EVERY: Duration = Duration::from_secs(600);
/// How old an artifact must be to be deleted: another process sharing the
/// compile cache may have just compiled a build this one does not know.
const EVICT_AFTER: Duration = Duration::from_secs(3600);
/// How far back a canary's failures are counted.
const CANARY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(15);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("version {version} of `{job_type}` is rolled out but not stored")]
    Missing { job_type: String, version: String },
    #[error("the stored manifest of {job_type} {version} does not parse: {source}")]
    Manifest { job_type: String, version: String, source: ManifestError },
    #[error("{job_type} {version} does not load: {source}")]
    Load { job_type: String, version: String, source: LoadError },
}

pub struct VersionSync {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    loaded: Mutex<HashMap<(String, String), Arc<HandlerVersion>>>,
}

impl VersionSync {
    pub fn new(store: Arc<dyn Store>, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self { store, registry, loaded: Mutex::default() })
    }

    /// Brings every rollout into the registry. A version that does not load
    /// is logged and its type keeps what it had; the others still apply.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let rollouts = self.store.rollouts().await?;
        let paused: BTreeSet<String> = rollouts.iter().filter(|r| r.paused).map(|r| r.job_type.clone()).collect();
        self.registry.set_paused(paused);
        let serving: BTreeSet<(String, String)> = rollouts
            .iter()
            .flat_map(|r| [&r.active_version, &r.canary_version].map(|v| v.clone().map(|v| (r.job_type.clone(), v))))
            .flatten()
            .collect();
        for rollout in rollouts {
            let Some(active) = &rollout.active_version else { continue };
            let active = match self.load(&rollout.job_type, active).await {
                Ok(active) => active,
                Err(error) => {
                    tracing::error!(%error, "cannot apply a rollout; the type keeps its current version");
                    continue;
                }
            };
            let canary = match (&rollout.canary_version, u8::try_from(rollout.canary_percent)) {
                (Some(version), Ok(percent)) if percent > 0 => match self.load(&rollout.job_type, version).await {
                    Ok(version) => Some(Canary { version, percent }),
                    Err(error) => {
                        tracing::error!(%error, "cannot load a canary; all jobs stay on the active version");
                        None
                    }
                },
                _ => None,
            };
            self.registry.apply_rollout(active, canary);
        }
        // A version no rollout serves any more is let go: it is compiled
        // again if a rollout names it later.
        self.lock().retain(|key, _| serving.contains(key));
        Ok(())
    }

    /// Deletes this process's compiled artifacts of components that are
    /// neither stored nor serving (versions pruned, builds replaced in the
    /// handlers directory) and were written more than an hour ago; returns how many.
    pub async fn evict_compiled(&self) -> anyhow::Result<usize> {
        let mut keep: HashSet<String> = self.store.versions().await?.into_iter().map(|v| v.sha256).collect();
        keep.extend(self.registry.serving_sha256s());
        keep.extend(self.lock().values().map(|h| h.sha256.clone()));
        let runtime = self.registry.runtime().clone();
        let evicted = tokio::task::spawn_blocking(move || runtime.evict_compiled(&keep, EVICT_AFTER)).await??;
        if evicted > 0 {
            tracing::info!(evicted, "deleted compiled artifacts of handler versions no longer stored");
        }
        Ok(evicted)
    }

    /// Rolls back each canary whose build asks for it and fails more than
    /// the active version by its margin; returns the types rolled back.
    pub async fn judge_canaries(&self) -> Result<Vec<String>, StoreError> {
        let now = Utc::now();
        let canaries: Vec<_> = self
            .store
            .rollouts()
            .await?
            .into_iter()
            .filter(|r| r.canary_version.is_some() && r.canary_percent > 0)
            .collect();
        if canaries.is_empty() {
            return Ok(Vec::new());
        }
        let counts = self.store.outcome_counts(now - CANARY_WINDOW).await?;
        let mut rolled_back = Vec::new();
        for rollout in canaries {
            let (Some(canary), Some(active)) = (rollout.canary_version.clone(), rollout.active_version.clone()) else {
                continue;
            };
            let Some(rule) = self.load(&rollout.job_type, &canary).await.ok().and_then(|h| h.manifest.auto_rollback)
            else {
                continue;
            };
            let versions = stats::by_version(&counts, &[], &rollout.job_type);
            let Some(on_canary) = versions.get(&canary) else { continue };
            let ended = on_canary.completed + on_canary.failed;
            let canary_rate = on_canary.error_rate.unwrap_or(0.0);
            let active_rate = versions.get(&active).and_then(|a| a.error_rate).unwrap_or(0.0);
            if ended < rule.min_jobs || canary_rate <= active_rate + rule.failure_rate_margin {
                continue;
            }
            // Only if the canary is still the one judged: an operator may
            // have replaced it meanwhile, and theirs stands.
            let step = rollout::Step::DropCanary { canary: canary.clone() };
            match rollout::change(self.store.as_ref(), &rollout.job_type, &step, None).await {
                Ok(after) if after.canary_version.is_none() => {}
                Ok(_) => continue,
                Err(rollout::ChangeError::Store(error)) => return Err(error),
                Err(error) => {
                    tracing::warn!(job_type = %rollout.job_type, %error, "could not roll the canary back");
                    continue;
                }
            }
            metrics::counter!(CANARY_ROLLBACKS, "type" => rollout.job_type.clone()).increment(1);
            tracing::warn!(
                job_type = %rollout.job_type,
                canary = %canary,
                active = %active,
                canary_failure_rate = canary_rate,
                active_failure_rate = active_rate,
                jobs = ended,
                "canary rolled back by itself: it failed more than the active version"
            );
            rolled_back.push(rollout.job_type);
        }
        if !rolled_back.is_empty() {
            self.sync().await?;
        }
        Ok(rolled_back)
    }

    /// A stored version, compiled (once per process).
    pub async fn load(&self, job_type: &str, version: &str) -> Result<Arc<HandlerVersion>, SyncError> {
        let key = (job_type.to_string(), version.to_string());
        if let Some(loaded) = self.lock().get(&key) {
            return Ok(loaded.clone());
        }
        let stored = self
            .store
            .version(job_type, version)
            .await?
            .ok_or_else(|| SyncError::Missing { job_type: job_type.into(), version: version.into() })?;
        let manifest = Manifest::parse(&stored.manifest).map_err(|source| SyncError::Manifest {
            job_type: job_type.into(),
            version: version.into(),
            source,
        })?;
        let runtime = self.registry.runtime().clone();
        // Compiling takes tens of milliseconds of CPU: off the async threads.
        let handler = tokio::task::spawn_blocking(move || runtime.load(&stored.component, manifest))
            .await
            .map_err(|error| SyncError::Load {
                job_type: job_type.into(),
                version: version.into(),
                source: LoadError::Compile(error.to_string()),
            })?
            .map_err(|source| SyncError::Load { job_type: job_type.into(), version: version.into(), source })?;
        // The id it is stored and rolled out under is its name, whatever
        // this build of quern would compute for it.
        let handler = Arc::new(handler.named(version));
        self.lock().insert(key, handler.clone());
        Ok(handler)
    }

    /// Syncs now, then on every change notice and every few seconds, until `stop`.
    /// Canaries are judged only while `leader` leads, so one process rolls
    /// a failing canary back.
    pub fn spawn(
        self: Arc<Self>,
        leader: super::leader::Leader,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut changes = loop {
                match self.store.rollout_changes().await {
                    Ok(changes) => break Some(changes),
                    Err(error) if !stop.is_cancelled() => {
                        tracing::warn!(%error, "cannot listen for rollout changes yet; polling meanwhile");
                        if let Err(error) = self.sync().await {
                            tracing::warn!(%error, "reading rollouts failed");
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(POLL) => {}
                        }
                    }
                    Err(_) => break None,
                }
            };
            let mut last_eviction: Option<std::time::Instant> = None;
            loop {
                if let Err(error) = self.sync().await {
                    tracing::warn!(%error, "reading rollouts failed; trying again shortly");
                }
                // Each process has its own compile cache: each evicts from it.
                if last_eviction.is_none_or(|last| last.elapsed() >= EVICT_EVERY) {
                    last_eviction = Some(std::time::Instant::now());
                    if let Err(error) = self.evict_compiled().await {
                        tracing::warn!(error = %format!("{error:#}"), "evicting compiled artifacts failed");
                    }
                }
                if leader.is_leader()
                    && let Err(error) = self.judge_canaries().await
                {
                    tracing::warn!(%error, "judging canaries failed; trying again shortly");
                }
                let notice = async {
                    match changes.as_mut() {
                        Some(changes) => changes.wait().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = notice => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<HandlerVersion>>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

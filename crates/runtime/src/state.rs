//! The state of one job's `Store`: WASI, the capabilities, and the limiter.
//! Built fresh for every job and dropped with it.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::Level;
use super::bindings::v0_2::quern::handler::{host, types};
use super::config::GrantedConfig;
use super::http::HttpCap;
use super::log::{JobLabels, LogBudget};
use super::progress::ProgressSink;

pub struct JobState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) http: HttpCap,
    pub(super) config: Arc<GrantedConfig>,
    pub(super) labels: JobLabels,
    pub(super) log_budget: LogBudget,
    pub(super) progress: Option<ProgressSink>,
}

impl WasiView for JobState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl host::Host for JobState {
    fn log(&mut self, level: Level, message: String) {
        super::log::write(&self.labels, &mut self.log_budget, level.as_str(), &message);
    }

    fn progress(&mut self, percent: u8, message: String) {
        super::progress::report(self.progress.as_ref(), &self.labels.job_id, percent, &message);
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key)
    }
}

impl types::Host for JobState {}

/// Caps a job's linear memory and remembers whether the cap was hit, so a
/// trap that follows (Rust aborts when an allocation fails) is reported as the
/// memory limit rather than as a bare trap.
pub struct MemoryLimiter {
    pub max_bytes: usize,
    pub hit: bool,
}

/// Table growth is capped too, generously: tables hold function references.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

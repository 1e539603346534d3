//! quern's settings, from flags or the environment (flag names mirror the
//! variables: `--data-dir` / `QUERN_DATA_DIR`). Later commands extend this
//! with the seed's names (PORT, WORKER_*, CACHE_*).

use std::path::PathBuf;
use std::time::Duration;

use crate::manifest::{Limits, MAX_DEADLINE_S, MAX_MEMORY_MB, MAX_OUTPUT_KB};
use crate::runtime::RuntimeSettings;
use crate::runtime::config::{ConfigSource, ConfigSourceError};

/// Settings of the WebAssembly runtime, shared by every command that runs handlers.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Where quern keeps its data: the embedded database and compiled handlers.
    #[arg(long, env = "QUERN_DATA_DIR", default_value = "quern-data")]
    pub data_dir: PathBuf,
    /// Where compiled handlers are cached [default: <data-dir>/compiled].
    #[arg(long, env = "QUERN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A TOML file of `KEY = "value"` lines that handlers may be granted; the
    /// environment wins over it.
    #[arg(long, env = "QUERN_HANDLER_CONFIG")]
    pub handler_config: Option<PathBuf>,
    /// Default linear-memory limit per job, for handlers that set none.
    #[arg(long, env = "QUERN_MEMORY_LIMIT_MB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=MAX_MEMORY_MB as i64))]
    pub memory_limit_mb: u32,
    /// Default wall-clock deadline per job, for handlers that set none.
    #[arg(long, env = "QUERN_DEADLINE_S", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=MAX_DEADLINE_S as i64))]
    pub deadline_s: u32,
    /// Default result-size limit per job, for handlers that set none.
    #[arg(long, env = "QUERN_OUTPUT_LIMIT_KB", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=MAX_OUTPUT_KB as i64))]
    pub output_limit_kb: u32,
}

impl RuntimeArgs {
    pub fn settings(&self) -> Result<RuntimeSettings, ConfigSourceError> {
        let mut config = ConfigSource::environment();
        if let Some(path) = &self.handler_config {
            config = config.with_file(path)?;
        }
        Ok(RuntimeSettings {
            default_limits: Limits {
                memory_bytes: (self.memory_limit_mb as usize) << 20,
                deadline: Duration::from_secs(self.deadline_s.into()),
                output_bytes: (self.output_limit_kb as usize) << 10,
            },
            config,
            cache_dir: Some(self.cache_dir.clone().unwrap_or_else(|| self.data_dir.join("compiled"))),
            ..RuntimeSettings::default()
        })
    }
}

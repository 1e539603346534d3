//! `quern:handler/host.config`: the configuration values granted to a handler.
//!
//! Built once per handler version: [`GrantedConfig`], the values of the keys its
//! manifest lists, read from the host's [`ConfigSource`]. A key not granted reads
//! as absent, whether or not the host has it; the manifest cannot grant the
//! host's own secrets (see `manifest::validate_config_key`).

use std::collections::HashMap;
use std::path::Path;

/// Where handler configuration values come from: a file of `KEY = "value"`
/// lines (optional), then the process environment, which wins.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    file_values: HashMap<String, String>,
    overrides: HashMap<String, String>,
    read_environment: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    #[error("cannot read handler config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("handler config file {path} is not a TOML table of string values: {message}")]
    Parse { path: String, message: String },
}

impl ConfigSource {
    /// Values from the process environment only.
    pub fn environment() -> Self {
        Self { read_environment: true, ..Self::default() }
    }

    /// No values at all (tests start here and add [`ConfigSource::with`]).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Adds values from a TOML file of `KEY = "value"` lines.
    pub fn with_file(mut self, path: &Path) -> Result<Self, ConfigSourceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigSourceError::Read { path: path.display().to_string(), source })?;
        self.file_values = toml::from_str(&text)
            .map_err(|e| ConfigSourceError::Parse { path: path.display().to_string(), message: e.to_string() })?;
        Ok(self)
    }

    /// Sets a value that wins over the file and the environment.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.overrides.insert(key.to_string(), value.to_string());
        self
    }

    /// The keys set with [`ConfigSource::with`].
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.overrides.keys().map(String::as_str)
    }

    /// The value of one key, wherever it is set.
    pub fn get(&self, key: &str) -> Option<String> {
        self.overrides
            .get(key)
            .cloned()
            .or_else(|| self.read_environment.then(|| std::env::var(key).ok()).flatten())
            .or_else(|| self.file_values.get(key).cloned())
    }

    /// The values of `keys` that the source has.
    pub fn grant(&self, keys: &[String]) -> GrantedConfig {
        GrantedConfig(keys.iter().filter_map(|key| Some((key.clone(), self.get(key)?))).collect())
    }
}

/// The configuration one handler version may read.
#[derive(Debug, Clone, Default)]
pub struct GrantedConfig(HashMap<String, String>);

impl GrantedConfig {
    pub fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_keys_are_visible() {
        let source = ConfigSource::empty().with("OLLAMA_URL", "http://o").with("OTHER", "secret");
        let granted = source.grant(&["OLLAMA_URL".to_string(), "MISSING".to_string()]);
        assert_eq!(granted.get("OLLAMA_URL").as_deref(), Some("http://o"));
        assert_eq!(granted.get("OTHER"), None);
        assert_eq!(granted.get("MISSING"), None);
    }
}

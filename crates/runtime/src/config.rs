//! `quern:handler/host.config`: the variables granted to a handler.
//!
//! The host declares the variables it offers handlers, each from one of three
//! places: `QUERN_VAR_<NAME>` in the process environment, the handler config
//! file (`KEY = "value"` lines), or a plain environment variable the operator
//! names in a setting (`QUERN_HANDLER_ENV=OLLAMA_URL,GEMINI_API_KEY`). Nothing
//! else in the environment is ever visible: an uploaded manifest cannot ask
//! for `AWS_SECRET_ACCESS_KEY` just because the process happens to have it.
//!
//! Built once per handler version: [`GrantedConfig`], the values of the keys its
//! manifest lists. A key not granted reads as absent, whether or not the host
//! has it; the manifest cannot grant the host's own secrets (see
//! `manifest::validate_config_key`).

use std::collections::HashMap;
use std::path::Path;

use crate::manifest::{ManifestError, validate_config_key};

/// The environment prefix that offers a variable to handlers: `QUERN_VAR_OLLAMA_URL`
/// declares `OLLAMA_URL`.
pub const VARIABLE_PREFIX: &str = "QUERN_VAR_";

/// Where handler variables come from, and which ones the host declares.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// Set by [`ConfigSource::with`]: win over everything.
    overrides: HashMap<String, String>,
    /// `QUERN_VAR_<NAME>` values, read once at start.
    prefixed: HashMap<String, String>,
    /// Plain environment variables the operator named, read once at start
    /// (a named one that is unset is declared and reads as absent).
    named: HashMap<String, Option<String>>,
    file_values: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    #[error("cannot read handler config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("handler config file {path} is not a TOML table of string values: {message}")]
    Parse { path: String, message: String },
    #[error("{origin} offers handlers `{key}`: {source}")]
    Key { origin: String, key: String, source: ManifestError },
}

impl ConfigSource {
    /// The `QUERN_VAR_<NAME>` variables of the process environment.
    pub fn environment() -> Result<Self, ConfigSourceError> {
        let mut prefixed = HashMap::new();
        for (name, value) in std::env::vars() {
            let Some(key) = name.strip_prefix(VARIABLE_PREFIX) else { continue };
            checked(key, || name.clone())?;
            prefixed.insert(key.to_string(), value);
        }
        Ok(Self { prefixed, ..Self::default() })
    }

    /// No values at all (tests start here and add [`ConfigSource::with`]).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Offers the named plain environment variables (the operator's
    /// `QUERN_HANDLER_ENV`), as they are now.
    pub fn with_environment_names(mut self, names: &[String]) -> Result<Self, ConfigSourceError> {
        for name in names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()) {
            checked(name, || "QUERN_HANDLER_ENV".to_string())?;
            self.named.insert(name.to_string(), std::env::var(name).ok());
        }
        Ok(self)
    }

    /// Adds values from a TOML file of `KEY = "value"` lines.
    pub fn with_file(mut self, path: &Path) -> Result<Self, ConfigSourceError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigSourceError::Read { path: shown.clone(), source })?;
        let values: HashMap<String, String> = toml::from_str(&text)
            .map_err(|e| ConfigSourceError::Parse { path: shown.clone(), message: e.to_string() })?;
        for key in values.keys() {
            checked(key, || format!("handler config file {shown}"))?;
        }
        self.file_values = values;
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

    /// Whether the host offers `key` to handlers (it may still be unset, when
    /// the operator named it in `QUERN_HANDLER_ENV` without a value).
    pub fn declares(&self, key: &str) -> bool {
        self.overrides.contains_key(key)
            || self.prefixed.contains_key(key)
            || self.named.contains_key(key)
            || self.file_values.contains_key(key)
    }

    /// Of `keys`, those the host does not offer, in their order.
    pub fn undeclared<'a>(&self, keys: &'a [String]) -> Vec<&'a str> {
        keys.iter().map(String::as_str).filter(|key| !self.declares(key)).collect()
    }

    /// The value of one declared key, wherever it is set.
    pub fn get(&self, key: &str) -> Option<String> {
        self.overrides
            .get(key)
            .or_else(|| self.prefixed.get(key))
            .or_else(|| self.named.get(key).and_then(Option::as_ref))
            .or_else(|| self.file_values.get(key))
            .cloned()
    }

    /// The values of `keys` that the source has.
    pub fn grant(&self, keys: &[String]) -> GrantedConfig {
        GrantedConfig(keys.iter().filter_map(|key| Some((key.clone(), self.get(key)?))).collect())
    }
}

/// A key the host offers must be one a manifest could ask for: never the
/// host's own secrets.
fn checked(key: &str, origin: impl FnOnce() -> String) -> Result<(), ConfigSourceError> {
    validate_config_key(key).map_err(|source| ConfigSourceError::Key { origin: origin(), key: key.to_string(), source })
}

/// The configuration one handler version may read.
#[derive(Debug, Clone, Default)]
pub struct GrantedConfig(HashMap<String, String>);

impl GrantedConfig {
    pub fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

/// The names a handler reads but the host does not offer, for a message.
pub fn list(keys: &[&str]) -> String {
    keys.iter().map(|key| format!("`{key}`")).collect::<Vec<_>>().join(", ")
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

    #[test]
    fn a_named_environment_variable_is_declared_even_when_unset() {
        let source = ConfigSource::empty().with_environment_names(&["SURELY_UNSET_IN_A_TEST".into()]).unwrap();
        assert!(source.declares("SURELY_UNSET_IN_A_TEST"));
        assert_eq!(source.get("SURELY_UNSET_IN_A_TEST"), None);
        assert_eq!(source.undeclared(&["SURELY_UNSET_IN_A_TEST".into(), "HOME".into()]), ["HOME"]);
    }

    #[test]
    fn the_host_cannot_offer_its_own_secrets() {
        let error = ConfigSource::empty().with_environment_names(&["DATABASE_URL".into()]).unwrap_err();
        assert!(error.to_string().contains("QUERN_HANDLER_ENV offers handlers `DATABASE_URL`"), "{error}");
    }
}

//! `handler.toml`: what a handler is allowed and how it is run.
//!
//! Every handler ships one beside its component (`<type>.wasm` + `<type>.toml`
//! in a handlers directory). Unknown fields are refused so that a typo is an
//! error, not a silently ignored setting.
//!
//! One file over 400 lines on purpose: the envelope's parsing and the checks
//! that refuse a bad manifest belong together; the last fifth is unit tests.

use serde::Deserialize;
use std::time::Duration;

use crate::http::{HostRule, RuleError};
use crate::webhook::Webhook;

/// Configuration keys no handler may be granted: they would hand it the
/// database, the ability to mint tokens, or the service role.
const NEVER_GRANTABLE: &[&str] =
    &["DATABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_DB_URL", "SUPABASE_JWT_SECRET", "PGPASSWORD"];
/// Prefixes no handler may be granted: the host's own settings.
const NEVER_GRANTABLE_PREFIXES: &[&str] = &["QUERN_", "PG"];

/// The largest limits a manifest may ask for; the engine's instance pool is
/// sized for these.
pub const MAX_MEMORY_MB: u32 = 1024;
pub const MAX_DEADLINE_S: u32 = 3600;
pub const MAX_OUTPUT_KB: u32 = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub job_type: String,
    pub description: String,
    pub estimated_time_s: u32,
    pub cacheable: bool,
    pub cache_ttl_hours: Option<u32>,
    /// Whose jobs share a cached result.
    pub cache_scope: CacheScope,
    pub max_attempts: u32,
    /// Who may enqueue this type (`[access] roles`); everyone signed in when empty.
    pub access: Vec<Role>,
    pub allowed_hosts: Vec<HostRule>,
    /// Allowed hosts taken from settings at load (`"{{ GEMINI_BASE_URL }}"`):
    /// the host and port of the URL each named setting holds.
    pub host_settings: Vec<String>,
    pub config_keys: Vec<String>,
    pub limits: LimitOverrides,
    /// Whether this build, as a canary, is rolled back by itself when it
    /// fails more than the active version.
    pub auto_rollback: Option<AutoRollback>,
    /// The legacy synchronous Edge Function this type replaces: quern serves
    /// `/functions/v1/<function>` itself (enqueue, wait, answer the result).
    pub function: Option<String>,
    /// A provider calls that function itself, without a user's token.
    pub webhook: Option<Webhook>,
    /// The text it was read from: with the component, it names the version.
    pub source: String,
}

/// Whose jobs may answer each other from the result cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// A user's own jobs only: the cache key includes the job's owner.
    #[default]
    User,
    /// Every user's: for inputs that carry nothing personal.
    Global,
}

/// A kind of caller, as `[access] roles` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A backend holding a service_role token.
    ServiceRole,
    /// Any signed-in user.
    Authenticated,
    /// A user whose token carries the premium claim.
    Premium,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceRole => "service_role",
            Self::Authenticated => "authenticated",
            Self::Premium => "premium",
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    roles: Vec<Role>,
}

/// `[rollout]` of a manifest: when a canary of this build is rolled back
/// without anyone asking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRollback {
    /// Canary jobs that must have ended before it is judged.
    pub min_jobs: u64,
    /// How far the canary's failure rate may exceed the active version's (0–1).
    pub failure_rate_margin: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    #[serde(default)]
    auto_rollback: bool,
    #[serde(default = "default_min_jobs")]
    min_jobs: u64,
    #[serde(default = "default_failure_rate_margin")]
    failure_rate_margin: f64,
}

fn default_min_jobs() -> u64 {
    20
}

fn default_failure_rate_margin() -> f64 {
    0.2
}

/// Limits a manifest sets; unset ones take the host's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub memory_mb: Option<u32>,
    pub deadline_s: Option<u32>,
    pub output_kb: Option<u32>,
}

/// The effective limits of one handler version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: usize,
    pub deadline: Duration,
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { memory_bytes: 64 << 20, deadline: Duration::from_secs(60), output_bytes: 1 << 20 }
    }
}

impl Limits {
    /// These limits with a manifest's overrides applied.
    pub fn with(self, overrides: LimitOverrides) -> Self {
        Self {
            memory_bytes: overrides.memory_mb.map_or(self.memory_bytes, |mb| (mb as usize) << 20),
            deadline: overrides.deadline_s.map_or(self.deadline, |s| Duration::from_secs(s.into())),
            output_bytes: overrides.output_kb.map_or(self.output_bytes, |kb| (kb as usize) << 10),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("{0}")]
    Syntax(String),
    #[error("invalid job type `{0}`: use lowercase letters, digits and `_`, starting with a letter (at most 64)")]
    JobType(String),
    #[error("configuration key `{0}` can never be granted to a handler: it is one of the host's secrets or settings")]
    ForbiddenKey(String),
    #[error("invalid configuration key `{0}`: use letters, digits and `_`")]
    InvalidKey(String),
    #[error("invalid allowed host `{rule}`: {reason}")]
    HostRule { rule: String, reason: String },
    #[error("limits.{name} = {value} is out of range: it must be between 1 and {max}")]
    Limit { name: &'static str, value: u32, max: u32 },
    #[error("max_attempts = {0} is out of range: it must be between 1 and 100")]
    MaxAttempts(u32),
    #[error(
        "function = \"{0}\" is not an Edge Function name: use lowercase letters, digits, - and _ (e.g. \"sofia-image-analysis\")"
    )]
    FunctionName(String),
    #[error("function = \"{0}\" is a route quern serves itself: a manifest cannot claim it")]
    OwnFunction(String),
    #[error("allowed host `{{{{ {0} }}}}` names a setting the manifest does not read: add \"{0}\" to [config] keys")]
    HostSetting(String),
    #[error("invalid [webhook]: {0}")]
    Webhook(String),
    #[error("rollout.{name} = {value} is out of range: {range}")]
    Rollout { name: &'static str, value: f64, range: &'static str },
}

impl From<RuleError> for ManifestError {
    fn from(error: RuleError) -> Self {
        Self::HostRule { rule: error.rule, reason: error.reason }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(rename = "type")]
    job_type: String,
    #[serde(default)]
    description: String,
    #[serde(default = "default_estimated_time_s")]
    estimated_time_s: u32,
    #[serde(default)]
    cacheable: bool,
    cache_ttl_hours: Option<u32>,
    #[serde(default)]
    cache_scope: CacheScope,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    config: RawConfig,
    #[serde(default)]
    limits: LimitOverrides,
    rollout: Option<RawRollout>,
    function: Option<String>,
    webhook: Option<Webhook>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    allowed_hosts: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    keys: Vec<String>,
}

fn default_estimated_time_s() -> u32 {
    10
}

fn default_max_attempts() -> u32 {
    3
}

impl Manifest {
    /// A manifest for a component run without one (`quern run`).
    pub fn bare(job_type: &str) -> Self {
        Self {
            job_type: job_type.to_string(),
            description: String::new(),
            estimated_time_s: default_estimated_time_s(),
            cacheable: false,
            cache_ttl_hours: None,
            cache_scope: CacheScope::User,
            max_attempts: 1,
            access: Vec::new(),
            source: String::new(),
            allowed_hosts: Vec::new(),
            host_settings: Vec::new(),
            config_keys: Vec::new(),
            limits: LimitOverrides::default(),
            auto_rollback: None,
            function: None,
            webhook: None,
        }
    }

    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|error| ManifestError::Syntax(error.to_string()))?;
        validate_job_type(&raw.job_type)?;
        for key in &raw.config.keys {
            validate_config_key(key)?;
        }
        let (mut allowed_hosts, mut host_settings) = (Vec::new(), Vec::new());
        for rule in &raw.http.allowed_hosts {
            match setting_named(rule) {
                Some(key) if raw.config.keys.iter().any(|k| k == key) => host_settings.push(key.to_string()),
                Some(key) => return Err(ManifestError::HostSetting(key.to_string())),
                None => allowed_hosts.push(HostRule::parse(rule)?),
            }
        }
        check_limit("memory_mb", raw.limits.memory_mb, MAX_MEMORY_MB)?;
        check_limit("deadline_s", raw.limits.deadline_s, MAX_DEADLINE_S)?;
        check_limit("output_kb", raw.limits.output_kb, MAX_OUTPUT_KB)?;
        if !(1..=100).contains(&raw.max_attempts) {
            return Err(ManifestError::MaxAttempts(raw.max_attempts));
        }
        if let Some(function) = &raw.function {
            validate_function_name(function)?;
        }
        if let Some(webhook) = &raw.webhook {
            webhook.check(raw.function.as_deref())?;
        }
        let auto_rollback = match raw.rollout {
            Some(rollout) if rollout.auto_rollback => {
                if !(0.0..=1.0).contains(&rollout.failure_rate_margin) {
                    return Err(ManifestError::Rollout {
                        name: "failure_rate_margin",
                        value: rollout.failure_rate_margin,
                        range: "between 0 and 1",
                    });
                }
                if rollout.min_jobs == 0 {
                    return Err(ManifestError::Rollout { name: "min_jobs", value: 0.0, range: "at least 1" });
                }
                Some(AutoRollback { min_jobs: rollout.min_jobs, failure_rate_margin: rollout.failure_rate_margin })
            }
            _ => None,
        };
        Ok(Self {
            job_type: raw.job_type,
            description: raw.description,
            estimated_time_s: raw.estimated_time_s,
            cacheable: raw.cacheable,
            cache_ttl_hours: raw.cache_ttl_hours,
            cache_scope: raw.cache_scope,
            max_attempts: raw.max_attempts,
            access: raw.access.roles,
            allowed_hosts,
            host_settings,
            config_keys: raw.config.keys,
            limits: raw.limits,
            auto_rollback,
            function: raw.function,
            webhook: raw.webhook,
            source: text.to_string(),
        })
    }
}

/// [`validate_job_type`]'s rule as a regular expression (for schemas).
pub const JOB_TYPE_PATTERN: &str = "^[a-z][a-z0-9_]{0,63}$";

pub fn validate_job_type(name: &str) -> Result<(), ManifestError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid { Ok(()) } else { Err(ManifestError::JobType(name.to_string())) }
}

/// The setting a host rule names, as `{{ NAME }}`.
fn setting_named(rule: &str) -> Option<&str> {
    Some(rule.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim())
}

/// The functions quern serves itself: no manifest may claim them.
pub const QUERNS_OWN_FUNCTIONS: [&str; 2] = ["enqueue-analysis", "get-analysis-status"];

/// A Supabase Edge Function's name: lowercase letters, digits, `-` and `_`;
/// never one of [`QUERNS_OWN_FUNCTIONS`].
pub fn validate_function_name(name: &str) -> Result<(), ManifestError> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(ManifestError::FunctionName(name.to_string()));
    }
    if QUERNS_OWN_FUNCTIONS.contains(&name) {
        return Err(ManifestError::OwnFunction(name.to_string()));
    }
    Ok(())
}

/// Refuses keys that are malformed or that name the host's own secrets.
pub fn validate_config_key(key: &str) -> Result<(), ManifestError> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ManifestError::InvalidKey(key.to_string()));
    }
    let upper = key.to_ascii_uppercase();
    if NEVER_GRANTABLE.contains(&upper.as_str()) || NEVER_GRANTABLE_PREFIXES.iter().any(|p| upper.starts_with(p)) {
        return Err(ManifestError::ForbiddenKey(key.to_string()));
    }
    Ok(())
}

fn check_limit(name: &'static str, value: Option<u32>, max: u32) -> Result<(), ManifestError> {
    match value {
        Some(value) if value == 0 || value > max => Err(ManifestError::Limit { name, value, max }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auto_rollback_is_asked_for_in_rollout_and_checked() {
        let manifest = Manifest::parse("type = \"a\"\n[rollout]\nauto_rollback = true\nmin_jobs = 5\n").unwrap();
        assert_eq!(manifest.auto_rollback, Some(AutoRollback { min_jobs: 5, failure_rate_margin: 0.2 }));
        assert_eq!(Manifest::parse("type = \"a\"\n[rollout]\nmin_jobs = 5\n").unwrap().auto_rollback, None);
        let error = Manifest::parse("type = \"a\"\n[rollout]\nauto_rollback = true\nfailure_rate_margin = 2.0\n");
        assert!(error.unwrap_err().to_string().contains("rollout.failure_rate_margin = 2 is out of range"));
        assert!(Manifest::parse("type = \"a\"\n[rollout]\nauto = true\n").is_err(), "unknown fields are errors");
    }

    #[test]
    fn a_host_may_come_from_a_setting_the_manifest_reads() {
        let manifest = Manifest::parse(
            "type = \"a\"\n[http]\nallowed_hosts = [\"x.example\", \"{{ GEMINI_BASE_URL }}\"]\n[config]\nkeys = [\"GEMINI_BASE_URL\"]\n",
        )
        .unwrap();
        assert_eq!(manifest.host_settings, ["GEMINI_BASE_URL"]);
        assert_eq!(manifest.allowed_hosts.len(), 1);
        let error = Manifest::parse("type = \"a\"\n[http]\nallowed_hosts = [\"{{ HOME }}\"]\n").unwrap_err();
        assert!(error.to_string().contains("add \"HOME\" to [config] keys"), "{error}");
    }

    #[test]
    fn a_legacy_function_name_is_checked() {
        let manifest = Manifest::parse("type = \"a\"\nfunction = \"sofia-image-analysis\"\n").unwrap();
        assert_eq!(manifest.function.as_deref(), Some("sofia-image-analysis"));
        let error = Manifest::parse("type = \"a\"\nfunction = \"../admin\"\n").unwrap_err();
        assert!(error.to_string().contains("is not an Edge Function name"), "{error}");
        let error = Manifest::parse("type = \"a\"\nfunction = \"get-analysis-status\"\n").unwrap_err();
        assert!(error.to_string().contains("a route quern serves itself"), "{error}");
    }

    #[test]
    fn full_manifest_parses() {
        let manifest = Manifest::parse(
            r#"
            type = "sofia_text"
            estimated_time_s = 8
            cacheable = true
            cache_ttl_hours = 12
            [http]
            allowed_hosts = ["api.example.com", "*.example.com", "127.0.0.1:11434"]
            [config]
            keys = ["OLLAMA_URL"]
            [limits]
            memory_mb = 128
            "#,
        )
        .unwrap();
        assert_eq!(manifest.job_type, "sofia_text");
        assert_eq!(manifest.allowed_hosts.len(), 3);
        assert_eq!(manifest.config_keys, ["OLLAMA_URL"]);
        let limits = Limits::default().with(manifest.limits);
        assert_eq!(limits.memory_bytes, 128 << 20);
        assert_eq!(limits.deadline, Duration::from_secs(60));
    }

    #[test]
    fn access_and_cache_scope_are_read_and_checked() {
        let manifest = Manifest::parse("type = \"a\"\n").unwrap();
        assert_eq!((manifest.cache_scope, manifest.access.as_slice()), (CacheScope::User, &[][..]));
        let manifest =
            Manifest::parse("type = \"a\"\ncache_scope = \"global\"\n[access]\nroles = [\"service_role\"]\n").unwrap();
        assert_eq!((manifest.cache_scope, manifest.access), (CacheScope::Global, vec![Role::ServiceRole]));
        let error = Manifest::parse("type = \"a\"\n[access]\nroles = [\"admin\"]\n").unwrap_err().to_string();
        assert!(error.contains("unknown variant `admin`"), "{error}");
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let error = Manifest::parse("type = \"echo\"\ncachable = true\n").unwrap_err();
        assert!(error.to_string().contains("cachable"), "{error}");
    }

    #[test]
    fn host_secrets_are_never_grantable() {
        for key in ["DATABASE_URL", "database_url", "QUERN_JWT_SECRET", "SUPABASE_SERVICE_ROLE_KEY", "PGPASSWORD"] {
            let text = format!("type = \"echo\"\n[config]\nkeys = [\"{key}\"]\n");
            assert_eq!(Manifest::parse(&text), Err(ManifestError::ForbiddenKey(key.to_string())));
        }
    }

    #[test]
    fn limits_out_of_range_are_named() {
        let error = Manifest::parse("type = \"echo\"\n[limits]\nmemory_mb = 0\n").unwrap_err();
        assert_eq!(error.to_string(), "limits.memory_mb = 0 is out of range: it must be between 1 and 1024");
    }

    #[test]
    fn bad_job_type_is_refused() {
        assert!(matches!(Manifest::parse("type = \"Echo Type\"\n"), Err(ManifestError::JobType(_))));
    }
}

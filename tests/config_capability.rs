//! `host.config` returns only what a handler's manifest grants, and the
//! host's secrets can never be granted.

mod support;

use std::sync::Arc;

use quern_runtime::config::ConfigSource;
use quern_runtime::manifest::{Manifest, ManifestError};
use quern_runtime::registry::read_component;
use quern_runtime::{JobSpec, Outcome, RunOptions, Runtime, RuntimeSettings};
use serde_json::json;
use support::dist;

#[tokio::test]
async fn only_granted_keys_are_returned() {
    let config = ConfigSource::empty()
        .with("OLLAMA_URL", "http://ollama:11434")
        .with("GEMINI_API_KEY", "not-for-this-handler")
        .with("DATABASE_URL", "postgres://secret@db/quern");
    let runtime = Arc::new(Runtime::new(RuntimeSettings { config, ..support::settings() }).unwrap());
    let (bytes, mut manifest) = read_component(&dist("fixtures/hostile.wasm")).unwrap();
    manifest.config_keys = vec!["OLLAMA_URL".into()];
    let handler = runtime.load(&bytes, manifest).unwrap();

    let input = json!({"mode": "config", "keys": ["OLLAMA_URL", "GEMINI_API_KEY", "DATABASE_URL", "PATH"]});
    let job = JobSpec { id: "j-config".into(), input: input.to_string(), attempt: 1, max_attempts: 1 };
    let Outcome::Completed { output } = runtime.run(&handler, &job, RunOptions::default()).await.outcome else {
        panic!("the config job should complete");
    };
    let values: serde_json::Value = serde_json::from_str(&output).unwrap();
    assert_eq!(
        values,
        json!({"OLLAMA_URL": "http://ollama:11434", "GEMINI_API_KEY": null, "DATABASE_URL": null, "PATH": null})
    );
}

#[test]
fn a_manifest_that_grants_the_database_url_is_refused() {
    let error = Manifest::parse("type = \"sneaky\"\n[config]\nkeys = [\"DATABASE_URL\"]\n").unwrap_err();
    assert_eq!(error, ManifestError::ForbiddenKey("DATABASE_URL".into()));
    assert!(error.to_string().contains("can never be granted"));
}

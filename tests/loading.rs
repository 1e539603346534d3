//! What is not a handler for this host is refused with a message that says
//! what is wrong.

mod support;

use quern_runtime::LoadError;
use quern_runtime::manifest::Manifest;
use quern_runtime::registry::{Registry, read_handler_pair};
use support::{dist, runtime};

fn load_bytes(bytes: &[u8]) -> LoadError {
    runtime().load(bytes, Manifest::bare("thing")).unwrap_err()
}

#[test]
fn a_file_that_is_not_webassembly_is_refused() {
    let error = load_bytes(b"PK\x03\x04 this is a zip file").to_string();
    assert_eq!(error, "not a WebAssembly file: it does not start with the `\\0asm` magic bytes");
}

#[test]
fn a_core_module_is_refused_with_how_to_build_a_component() {
    let error = load_bytes(b"\0asm\x01\0\0\0").to_string();
    assert!(error.contains("a core WebAssembly module, not a component"), "{error}");
    assert!(error.contains("wasm32-wasip2"), "{error}");
}

#[test]
fn a_component_of_another_world_is_refused_naming_the_mismatch() {
    let bytes = std::fs::read(dist("fixtures/wrong_world.wasm")).unwrap();
    let error = load_bytes(&bytes).to_string();
    assert!(
        error.starts_with(
            "the component does not fit the worlds this host runs (quern:handler/handler@0.2.0, quern:handler/handler@0.1.0)"
        ),
        "{error}"
    );
    assert!(error.contains("export func `handle`"), "{error}");
}

#[test]
fn a_truncated_component_is_refused_as_not_compiling() {
    let bytes = std::fs::read(dist("echo.wasm")).unwrap();
    let error = load_bytes(&bytes[..bytes.len() / 2]);
    assert!(matches!(error, LoadError::Compile(_)), "{error}");
}

#[test]
fn a_manifest_naming_another_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("echo.wasm"), dir.path().join("echo.wasm")).unwrap();
    std::fs::write(dir.path().join("echo.toml"), "type = \"other\"\n").unwrap();
    let error = read_handler_pair(&dir.path().join("echo.wasm")).unwrap_err().to_string();
    assert!(error.contains("declares type `other` but is named for `echo`"), "{error}");
}

#[test]
fn a_malformed_manifest_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("echo.wasm"), dir.path().join("echo.wasm")).unwrap();
    std::fs::write(dir.path().join("echo.toml"), "type = \"echo\"\nmax_attempts = \"three\"\n").unwrap();
    let error = read_handler_pair(&dir.path().join("echo.wasm")).unwrap_err().to_string();
    assert!(error.starts_with("invalid manifest"), "{error}");
    assert!(error.contains("max_attempts"), "{error}");
}

#[test]
fn a_directory_loads_every_good_pair_and_reports_the_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("echo.wasm"), dir.path().join("echo.wasm")).unwrap();
    std::fs::copy(dist("echo.toml"), dir.path().join("echo.toml")).unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"not wasm").unwrap();
    std::fs::write(dir.path().join("broken.toml"), "type = \"broken\"\n").unwrap();
    let registry = Registry::new(runtime());
    let results = registry.load_dir(dir.path()).unwrap();
    assert_eq!(results.len(), 2);
    assert!(registry.get("echo").is_some());
    assert!(registry.get("broken").is_none());
    let broken = results.iter().find(|(path, _)| path.ends_with("broken.wasm")).unwrap();
    assert!(broken.1.as_ref().unwrap_err().to_string().contains("not a WebAssembly file"));
}

#[test]
fn a_host_from_a_setting_resolves_at_load_and_a_bad_value_is_never_echoed() {
    let bytes = std::fs::read(support::dist("echo.wasm")).unwrap();
    let manifest = quern_runtime::manifest::Manifest::parse(
        "type = \"echo\"\n[http]\nallowed_hosts = [\"{{ GEMINI_BASE_URL }}\"]\n[config]\nkeys = [\"GEMINI_BASE_URL\"]\n",
    )
    .unwrap();
    let with = |value: &str| quern_runtime::RuntimeSettings {
        config: quern_runtime::config::ConfigSource::empty().with("GEMINI_BASE_URL", value),
        ..support::settings()
    };
    let runtime = quern_runtime::Runtime::new(with("https://ai.gateway.lovable.dev/v1")).unwrap();
    let handler = runtime.load(&bytes, manifest.clone()).unwrap();
    let hosts: Vec<String> = handler.manifest.allowed_hosts.iter().map(ToString::to_string).collect();
    assert_eq!(hosts, ["ai.gateway.lovable.dev"]);

    let runtime = quern_runtime::Runtime::new(with("sk-live-not-a-url")).unwrap();
    let Err(error) = runtime.load(&bytes, manifest.clone()) else { panic!("a value that is not a URL is refused") };
    let error = error.to_string();
    assert!(error.contains("GEMINI_BASE_URL is not a URL") && !error.contains("sk-live"), "{error}");

    let unset = quern_runtime::Runtime::new(support::settings()).unwrap();
    assert!(unset.load(&bytes, manifest).unwrap().manifest.allowed_hosts.is_empty(), "an unset setting grants nothing");
}

//! `quern run`: the real binary, one job, exit codes 0/1/2/3.

mod support;

use std::process::{Command, Output};

use support::{cache_dir, dist};

fn quern_run(args: &[&str]) -> Output {
    let data = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_quern"))
        .arg("run")
        .args(args)
        .env("QUERN_DATA_DIR", data.path())
        .env("QUERN_CACHE_DIR", cache_dir())
        .env("DATABASE_URL", "postgres://quern:secret@db/quern")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn echo_prints_its_result_and_exits_0() {
    let echo = dist("echo.wasm");
    let out = quern_run(&[echo.to_str().unwrap(), "--input", r#"{"a":1}"#]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(r#""a":1"#), "{stdout}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["job"]["type"], "echo");
    assert!(text(&out.stderr).contains("progress 100% echoed"));
}

#[test]
fn invalid_json_input_exits_2_naming_the_problem() {
    let echo = dist("echo.wasm");
    let out = quern_run(&[echo.to_str().unwrap(), "--input", r#"{"a":1"#]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("invalid input: not valid JSON: EOF while parsing an object at line 1 column 6"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn input_that_is_not_an_object_exits_2() {
    let echo = dist("echo.wasm");
    let out = quern_run(&[echo.to_str().unwrap(), "--input", "[1,2]"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("expected a JSON object, got an array"));
}

#[test]
fn a_retry_exits_1_with_its_delay() {
    let hostile = dist("fixtures/hostile.wasm");
    let out = quern_run(&[
        hostile.to_str().unwrap(),
        "--input",
        r#"{"mode":"retry","reason":"upstream busy","delay_ms":2000}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("retry (not before 2000 ms): upstream busy"), "{}", text(&out.stderr));
}

#[test]
fn a_panic_exits_2_with_the_message() {
    let hostile = dist("fixtures/hostile.wasm");
    let out = quern_run(&[hostile.to_str().unwrap(), "--input", r#"{"mode":"panic","message":"boom"}"#]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("failed: the handler panicked: boom"), "{}", text(&out.stderr));
}

#[test]
fn a_missing_component_exits_3() {
    let out = quern_run(&["does-not-exist.wasm"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("does-not-exist.wasm"), "{}", text(&out.stderr));
}

#[test]
fn a_usage_error_exits_3() {
    let out = quern_run(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn granted_config_is_visible_and_host_secrets_are_not() {
    let hostile = dist("fixtures/hostile.wasm");
    let input = r#"{"mode":"config","keys":["OLLAMA_URL","DATABASE_URL"]}"#;
    let out = quern_run(&[hostile.to_str().unwrap(), "--input", input, "--config", "OLLAMA_URL=http://o:11434"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let values: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(values, serde_json::json!({"OLLAMA_URL": "http://o:11434", "DATABASE_URL": null}));
}

#[test]
fn granting_the_database_url_is_refused() {
    let echo = dist("echo.wasm");
    let out = quern_run(&[echo.to_str().unwrap(), "--config", "DATABASE_URL=x"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("can never be granted"), "{}", text(&out.stderr));
}

#[test]
fn a_handler_that_floods_its_output_logs_only_its_budget() {
    let hostile = dist("fixtures/hostile.wasm");
    let flood: String = (0..3000).map(|n| format!("flood line {n}\n")).collect();
    let input = serde_json::json!({"mode": "print", "stdout": flood, "stderr": "one more"}).to_string();
    let out = quern_run(&[hostile.to_str().unwrap(), "--input", &input]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let logged = stderr.lines().filter(|line| line.contains("flood line")).count();
    assert_eq!(logged, 200, "a job logs at most 200 lines");
    assert!(stderr.contains("the handler wrote more than a job may log; the rest was dropped"), "{stderr}");
    let warning = stderr.lines().find(|line| line.contains("more than a job may log")).unwrap_or_default();
    assert!(warning.contains("2801"), "3,000 + 1 lines, 200 logged: {warning}");
}

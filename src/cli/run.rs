//! `quern run`: one handler, one job, no queue.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use quern::config::RuntimeArgs;
use quern_runtime::http::HostRule;
use quern_runtime::manifest::validate_config_key;
use quern_runtime::registry::read_component;
use quern_runtime::{JobSpec, Outcome, RunOptions, Runtime};

use super::{EXIT_FAILED, EXIT_HOST_ERROR, EXIT_RETRY};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The component (`<type>.wasm`); its manifest `<type>.toml` beside it is
    /// used when present.
    component: PathBuf,
    /// The job input, a JSON object.
    #[arg(long, conflicts_with = "input_file")]
    input: Option<String>,
    /// Read the job input from a file (`-` for stdin).
    #[arg(long)]
    input_file: Option<PathBuf>,
    /// Allow one more outbound host (`api.example.com`, `*.example.com`,
    /// `127.0.0.1:11434`); repeatable.
    #[arg(long = "allow-host", value_name = "RULE")]
    allow_hosts: Vec<String>,
    /// Grant a configuration value to the handler; repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    config: Vec<(String, String)>,
    /// Wall-clock deadline in seconds (overrides the manifest).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Which attempt to present to the handler.
    #[arg(long, default_value_t = 1)]
    attempt: u32,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got `{text}`"))?;
    validate_config_key(key).map_err(|e| e.to_string())?;
    Ok((key.to_string(), value.to_string()))
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(&args)?;
    if let Err(problem) = check_input(&input) {
        eprintln!("failed: invalid input: {problem}");
        return Ok(EXIT_FAILED.into());
    }

    let (bytes, mut manifest) = read_component(&args.component)?;
    for rule in &args.allow_hosts {
        manifest.allowed_hosts.push(HostRule::parse(rule)?);
    }
    let mut settings = args.runtime.settings()?;
    for (key, value) in &args.config {
        settings.config = settings.config.with(key, value);
        manifest.config_keys.push(key.clone());
    }
    settings.max_instances = 2;
    let runtime = Runtime::new(settings)?;
    let mut handler =
        runtime.load(&bytes, manifest).with_context(|| format!("cannot load {}", args.component.display()))?;
    if let Some(seconds) = args.timeout {
        if !(seconds > 0.0 && seconds <= 3600.0) {
            bail!("--timeout must be between 0 and 3600 seconds, got {seconds}");
        }
        handler.limits.deadline = Duration::from_secs_f64(seconds);
    }

    let job = JobSpec {
        id: format!("run-{:016x}", rand::random::<u64>()),
        input,
        attempt: args.attempt.max(1),
        max_attempts: handler.manifest.max_attempts.max(args.attempt),
    };
    let options = RunOptions {
        progress: Some(Arc::new(|p| eprintln!("progress {:>3}% {}", p.percent, p.message))),
        ..RunOptions::default()
    };
    let executor = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).build()?;
    let report = executor.block_on(async {
        let cancel = options.cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
        runtime.run(&handler, &job, options).await
    });
    Ok(match report.outcome {
        Outcome::Completed { output } => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Outcome::Retry { reason, delay } => {
            match delay {
                Some(delay) => eprintln!("retry (not before {} ms): {reason}", delay.as_millis()),
                None => eprintln!("retry: {reason}"),
            }
            EXIT_RETRY.into()
        }
        Outcome::Failed { reason } => {
            eprintln!("failed: {reason}");
            EXIT_FAILED.into()
        }
        Outcome::Cancelled => {
            eprintln!("cancelled");
            EXIT_HOST_ERROR.into()
        }
    })
}

fn read_input(args: &RunArgs) -> anyhow::Result<String> {
    match (&args.input, &args.input_file) {
        (Some(input), _) => Ok(input.clone()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("cannot read the input from stdin")?;
            Ok(text)
        }
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read the input file {}", path.display()))
        }
        (None, None) => Ok("{}".to_string()),
    }
}

/// A job's input must be a JSON object; says what is wrong otherwise.
fn check_input(input: &str) -> Result<(), String> {
    match serde_json::from_str::<serde_json::Value>(input) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(other) => Err(format!("expected a JSON object, got {}", json_kind(&other))),
        Err(error) => Err(format!("not valid JSON: {error}")),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

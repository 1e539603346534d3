//! `quern handlers …`: the handler-version API from a terminal
//! (`QUERN_URL`, `QUERN_TOKEN` with the service role).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};

#[derive(clap::Args, Debug)]
pub struct HandlersArgs {
    /// The gateway.
    #[arg(long, env = "QUERN_URL", default_value = "http://127.0.0.1:3001", global = true)]
    url: String,
    /// A service_role token (`quern token --user ops --role service_role`).
    #[arg(long, env = "QUERN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: HandlersCommand,
}

#[derive(clap::Subcommand, Debug)]
enum HandlersCommand {
    /// Upload a build and roll it out: `<type>.wasm` (with `<type>.toml`
    /// beside it), or a directory holding one such pair or a `handler.toml`
    /// and one `.wasm`.
    Push {
        path: PathBuf,
        /// Roll out to this share of new jobs as a canary instead of all.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
        canary: Option<u8>,
        /// Upload only; roll out later with `quern handlers rollout`.
        #[arg(long, conflicts_with = "canary")]
        no_rollout: bool,
    },
    /// Types, their versions, the split and per-version counts.
    List,
    /// Roll a stored version out: 100 (default) for all new jobs, 1–99 as a canary, 0 to drop the canary.
    Rollout {
        job_type: String,
        version: String,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
    },
    /// Drop the canary, or return to the previous version.
    Rollback { job_type: String },
    /// Stop enqueues and claims of a type on every gateway and worker.
    Pause { job_type: String },
    /// Undo a pause.
    Resume { job_type: String },
}

pub fn handlers(args: HandlersArgs) -> anyhow::Result<ExitCode> {
    let token = args
        .token
        .clone()
        .context("no token: set QUERN_TOKEN to a service_role token (quern token --user ops --role service_role)")?;
    let api = Api { base: args.url.trim_end_matches('/').to_string(), token, client: reqwest::Client::new() };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        match args.command {
            HandlersCommand::Push { path, canary, no_rollout } => {
                let (job_type, component, manifest) = read_build(&path)?;
                let form = reqwest::multipart::Form::new()
                    .part("component", reqwest::multipart::Part::bytes(component).file_name(format!("{job_type}.wasm")))
                    .text("manifest", manifest);
                let request = api.client.post(format!("{}/v1/handlers/{job_type}/versions", api.base)).multipart(form);
                let uploaded = api.send(request).await?;
                let version = uploaded["version"].as_str().unwrap_or_default().to_string();
                let fresh = if uploaded["created"] == true { "uploaded" } else { "already stored" };
                println!("{job_type} {version} {fresh} ({} bytes)", uploaded["size_bytes"]);
                if !no_rollout {
                    let percent = canary.unwrap_or(100);
                    let rollout = api.rollout(&job_type, &version, percent).await?;
                    print_rollout(&rollout);
                }
            }
            HandlersCommand::List => print_list(&api.call(reqwest::Method::GET, "/v1/handlers", None).await?),
            HandlersCommand::Rollout { job_type, version, percent } => {
                print_rollout(&api.rollout(&job_type, &version, percent).await?)
            }
            HandlersCommand::Rollback { job_type } => print_rollout(
                &api.call(reqwest::Method::POST, &format!("/v1/handlers/{job_type}/rollback"), None).await?,
            ),
            HandlersCommand::Pause { job_type } => {
                print_rollout(&api.call(reqwest::Method::POST, &format!("/v1/handlers/{job_type}/pause"), None).await?)
            }
            HandlersCommand::Resume { job_type } => {
                print_rollout(&api.call(reqwest::Method::POST, &format!("/v1/handlers/{job_type}/resume"), None).await?)
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        self.send(request).await
    }

    async fn rollout(&self, job_type: &str, version: &str, percent: u8) -> anyhow::Result<Value> {
        let body = json!({"version": version, "percent": percent});
        self.call(reqwest::Method::POST, &format!("/v1/handlers/{job_type}/rollout"), Some(body)).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach quern at {} (set QUERN_URL)", self.base))?;
        let status = response.status();
        let text = response.text().await?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["error"].as_str().map_or(text.clone(), str::to_string);
            bail!("{status}: {message}");
        }
        Ok(body)
    }
}

/// The type, component bytes and manifest text of a build on disk.
fn read_build(path: &Path) -> anyhow::Result<(String, Vec<u8>, String)> {
    let (wasm, toml) = if path.is_dir() {
        let files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let wasm: Vec<&PathBuf> = files.iter().filter(|p| p.extension().is_some_and(|e| e == "wasm")).collect();
        let [wasm] = wasm.as_slice() else {
            bail!(
                "{} holds {} .wasm files: give the one to push (quern handlers push <type>.wasm)",
                path.display(),
                wasm.len()
            );
        };
        let beside = wasm.with_extension("toml");
        let toml = if beside.exists() { beside } else { path.join("handler.toml") };
        ((*wasm).clone(), toml)
    } else {
        (path.to_path_buf(), path.with_extension("toml"))
    };
    let component = std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    let manifest = std::fs::read_to_string(&toml)
        .with_context(|| format!("cannot read {} (the handler's manifest, beside its component)", toml.display()))?;
    let job_type = quern_runtime::manifest::Manifest::parse(&manifest)
        .with_context(|| format!("{} does not parse", toml.display()))?
        .job_type;
    Ok((job_type, component, manifest))
}

fn print_rollout(rollout: &Value) {
    let text = |key: &str| rollout[key].as_str().unwrap_or("-").to_string();
    println!(
        "{}: active {}, canary {} ({} %), previous {}{}",
        text("type"),
        text("active_version"),
        text("canary_version"),
        rollout["canary_percent"],
        text("previous_version"),
        if rollout["paused"] == true { ", PAUSED" } else { "" }
    );
}

fn print_list(types: &Value) {
    println!(
        "{:<20} {:<13} {:<13} {:>6} {:<7} {:<8} {:>9} {:>7} {:>9}",
        "TYPE", "VERSION", "STATE", "SPLIT", "PAUSED", "SOURCE", "COMPLETED", "FAILED", "P95"
    );
    for t in types.as_array().into_iter().flatten() {
        let split = match t["canary_percent"].as_i64() {
            Some(p) if p > 0 => format!("{p} %"),
            _ => "-".into(),
        };
        let source = if t["managed"] == true { "api" } else { "dir" };
        let paused = if t["paused"] == true { "yes" } else { "no" };
        for v in t["versions"].as_array().into_iter().flatten() {
            let p95 = v["p95_ms"].as_f64().map_or("-".into(), |ms| format!("{ms:.0} ms"));
            println!(
                "{:<20} {:<13} {:<13} {:>6} {:<7} {:<8} {:>9} {:>7} {:>9}",
                t["type"].as_str().unwrap_or(""),
                v["version"].as_str().unwrap_or(""),
                v["state"].as_str().unwrap_or(""),
                split,
                paused,
                source,
                v["completed"].as_u64().unwrap_or(0),
                v["failed"].as_u64().unwrap_or(0),
                p95
            );
        }
    }
}

//! `quern bench isolation`: how the gateway answers while every worker slot
//! runs a handler that spins. A real `quern serve` process (SQLite, its own
//! data directory) is started; this process times `GET /health` and `GET
//! /v1/jobs/{id}` over loopback, first with the worker idle, then with each
//! of its slots spinning in a guest that never calls the host.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use super::{Latencies, millis};
use quern_api::auth::mint;

#[derive(clap::Args, Debug, Clone)]
pub struct IsolationBenchArgs {
    /// Worker slots, all of them spinning during the second measurement.
    #[arg(long, default_value_t = 5)]
    pub slots: u32,
    /// Requests per measurement and route.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// The fixture that spins (`handlers-dist/fixtures/hostile.wasm`).
    #[arg(long, default_value = "handlers-dist/fixtures/hostile.wasm")]
    pub spinner: PathBuf,
    /// A handler to read a job of (`handlers-dist/echo.wasm`).
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub echo: PathBuf,
}

/// The server process, killed if the bench stops early.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: &IsolationBenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("quern-bench-isolation-{}", std::process::id()));
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers)?;
    std::fs::copy(&args.spinner, handlers.join("spin.wasm")).with_context(|| format!("{}", args.spinner.display()))?;
    std::fs::write(handlers.join("spin.toml"), "type = \"spin\"\nmax_attempts = 1\n[limits]\ndeadline_s = 600\n")?;
    std::fs::copy(&args.echo, handlers.join("echo.wasm")).with_context(|| format!("{}", args.echo.display()))?;
    std::fs::write(handlers.join("echo.toml"), "type = \"echo\"\n")?;
    let secret = "bench-isolation-secret-0123456789abcdef";
    let log = dir.join("quern.log");
    let server = Serve(
        Command::new(std::env::current_exe()?)
            .arg("serve")
            .env("DATABASE_URL", format!("sqlite://{}", dir.join("quern.db").display()))
            .env("QUERN_DATA_DIR", dir.join("data"))
            .env("QUERN_HANDLERS_DIR", &handlers)
            .env("QUERN_JWT_SECRET", secret)
            .env("QUERN_BIND", "127.0.0.1")
            .env("PORT", "0")
            .env("QUERN_LOG_FORMAT", "json")
            .env("QUERN_LOG", "info")
            .env("QUERN_RATE_LIMIT_PER_MIN", "0")
            .env("QUERN_MAX_ACTIVE_JOBS_PER_USER", "0")
            .env("WORKER_CONCURRENCY", args.slots.to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let result = measure(args, &log, secret).await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(args: &IsolationBenchArgs, log: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let base = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let listening = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["message"] == "gateway listening");
        if let Some(addr) = listening.and_then(|line| line["addr"].as_str().map(str::to_string)) {
            break format!("http://{addr}");
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "quern serve did not start: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let token = mint(secret.as_bytes(), "bench", true, None, Duration::from_secs(3600))?;
    let client = reqwest::Client::new();
    let enqueue = |job_type: &'static str, input: Value| {
        let request = client
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(json!({"type": job_type, "input": input}).to_string());
        async move { anyhow::Ok(serde_json::from_slice::<Value>(&request.send().await?.bytes().await?)?) }
    };
    let echo = enqueue("echo", json!({"read": "me"})).await?;
    let job_path = format!("/v1/jobs/{}", echo["id"].as_str().context("no job id")?);
    println!(
        "quern bench isolation: quern serve on SQLite, {} worker slots, {} requests per route",
        args.slots, args.requests
    );

    let quiet = time_routes(&client, &base, &token, &job_path, args.requests).await?;
    for n in 0..args.slots {
        enqueue("spin", json!({"mode": "spin", "n": n})).await?;
    }
    let spinning = loop {
        let response = client
            .get(format!("{base}/v1/jobs?status=processing&type=spin&limit=100"))
            .bearer_auth(&token)
            .send()
            .await?;
        let listed: Value = serde_json::from_slice(&response.bytes().await?)?;
        let running = listed["jobs"].as_array().map_or(0, Vec::len);
        if running == args.slots as usize {
            break running;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "only {running} spinning jobs started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let busy = time_routes(&client, &base, &token, &job_path, args.requests).await?;
    for ((route, quiet), (_, busy)) in quiet.iter().zip(&busy) {
        println!(
            "  {route:<18} idle worker p50 {} p99 {} max {} · {spinning} slots spinning p50 {} p99 {} max {}",
            millis(quiet.p50),
            millis(quiet.p99),
            millis(quiet.max),
            millis(busy.p50),
            millis(busy.p99),
            millis(busy.max)
        );
    }
    Ok(())
}

/// Sequential requests to each route; their latencies.
async fn time_routes(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    job_path: &str,
    requests: usize,
) -> anyhow::Result<Vec<(&'static str, Latencies)>> {
    let mut out = Vec::new();
    for (route, path, auth) in [("GET /health", "/health", false), ("GET /v1/jobs/{id}", job_path, true)] {
        let mut samples = Vec::with_capacity(requests);
        for _ in 0..requests {
            let mut request = client.get(format!("{base}{path}"));
            if auth {
                request = request.bearer_auth(token);
            }
            let sent = Instant::now();
            let response = request.send().await?;
            anyhow::ensure!(response.status().is_success(), "{route} answered {}", response.status());
            response.bytes().await?;
            samples.push(sent.elapsed());
        }
        out.push((route, Latencies::of(&mut samples).context("no samples")?));
    }
    Ok(out)
}

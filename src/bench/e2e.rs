//! `quern bench e2e`: the customer's load test (seed 001) end to end. A
//! gateway and a worker in this process, on a fresh database, run
//! `sofia_text` against a fake chat API that answers after a set delay (the
//! model's thinking time). N simulated users each enqueue a meal over HTTP
//! and poll its status until it completes, then start the next, for a set
//! time. Prints gateway latency, end-to-end latency, jobs/s and errors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::queue::{Backend, open, progress};
use super::{Latencies, millis, thousands};
use quern_api::auth::{Auth, AuthSettings, PremiumRule, mint};
use quern_api::{self as api, Gateway, GatewaySettings};
use quern_fakes::{Fake, Kind, Mode};
use quern_queue::worker::{Worker, WorkerSettings};
use quern_queue::{Queue, QueueSettings};
use quern_runtime::config::ConfigSource;
use quern_runtime::http::HostRule;
use quern_runtime::manifest::Manifest;
use quern_runtime::registry::{Registry, read_component};
use quern_runtime::{Runtime, RuntimeSettings};

#[derive(clap::Args, Debug, Clone)]
pub struct E2eBenchArgs {
    #[arg(long, value_enum, default_value = "sqlite")]
    pub db: Backend,
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Simulated users, each following one job at a time.
    #[arg(long, default_value_t = 50)]
    pub users: usize,
    /// How long the users keep going.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// How long the fake model takes to answer.
    #[arg(long, default_value_t = 2000)]
    pub model_delay_ms: u64,
    /// How often a user polls its job's status.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Worker concurrency.
    #[arg(long, default_value_t = 20)]
    pub concurrency: u32,
    /// The handler run for every job.
    #[arg(long, default_value = "handlers-dist/sofia_text.wasm")]
    pub component: PathBuf,
}

/// One user's figures.
#[derive(Default)]
struct UserLog {
    gateway: Vec<Duration>,
    end_to_end: Vec<Duration>,
    errors: usize,
}

pub async fn run(args: &E2eBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(args.db, &args.postgres_url, "e2e").await?;
    let model = Fake::start(Kind::Chat).await;
    model.set(Mode::Slow(Duration::from_millis(args.model_delay_ms)));
    let (bytes, mut manifest): (Vec<u8>, Manifest) = read_component(&args.component)?;
    manifest.allowed_hosts.push(HostRule::parse("127.0.0.1")?);
    let config = ConfigSource::empty().with("OLLAMA_URL", &model.url());
    let settings = RuntimeSettings { config, max_instances: args.concurrency * 2 + 4, ..RuntimeSettings::default() };
    let runtime = Arc::new(Runtime::new(settings)?);
    let registry = Registry::new(runtime.clone());
    let job_type = manifest.job_type.clone();
    registry.install(runtime.load(&bytes, manifest)?);
    let queue = Arc::new(Queue::new(
        store.clone(),
        QueueSettings { retry_base: Duration::from_millis(200), ..QueueSettings::default() },
    ));

    let shutdown = CancellationToken::new();
    let worker = Worker::new(
        queue.clone(),
        registry.clone(),
        WorkerSettings {
            concurrency: args.concurrency,
            poll_interval: Duration::from_millis(200),
            ..WorkerSettings::default()
        },
    );
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    let secret = rand::random::<[u8; 32]>().to_vec();
    let premium = PremiumRule::parse("app_metadata.plan=premium").map_err(anyhow::Error::msg)?;
    let auth = Auth::new(AuthSettings { hs256_secret: Some(secret.clone()), jwks_url: None, audience: None, premium })?;
    let gateway_settings = GatewaySettings { rate_limit_per_min: None, ..GatewaySettings::default() };
    let gateway =
        Gateway::new(queue, registry, auth, gateway_settings, quern_api::InProcess::alone(), shutdown.clone());
    let (router, _) = api::router(gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(api::serve(listener, router, Default::default(), shutdown.clone()));

    println!(
        "quern bench e2e: {} users for {} s on {}, {job_type} against a model answering in {} ms, worker concurrency {}",
        args.users,
        args.seconds,
        store.backend(),
        args.model_delay_ms,
        args.concurrency
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let bar = progress(args.seconds, "running");
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut users = tokio::task::JoinSet::new();
    for user in 0..args.users {
        let token =
            format!("Bearer {}", mint(&secret, &format!("user-{user}"), false, None, Duration::from_secs(3600))?);
        let (client, base, job_type) = (client.clone(), base.clone(), job_type.clone());
        let poll = Duration::from_millis(args.poll_ms);
        users.spawn(simulate_user(client, base, token, job_type, user, poll, until));
    }
    let ticker = tick(bar.clone(), until);
    let mut log = UserLog::default();
    while let Some(user) = users.join_next().await {
        let user = user?;
        log.gateway.extend(user.gateway);
        log.end_to_end.extend(user.end_to_end);
        log.errors += user.errors;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    shutdown.cancel();
    let _ = server.await;
    worker.await??;
    cleanup.run().await;

    let requests = log.gateway.len();
    let jobs = log.end_to_end.len();
    let gateway = Latencies::of(&mut log.gateway).ok_or_else(|| anyhow::anyhow!("no request succeeded"))?;
    let end_to_end = Latencies::of(&mut log.end_to_end).ok_or_else(|| anyhow::anyhow!("no job completed"))?;
    println!(
        "  gateway     p50 {}  p95 {}  p99 {}  ({} requests, {} req/s)",
        millis(gateway.p50),
        millis(gateway.p95),
        millis(gateway.p99),
        thousands(requests as f64),
        thousands(requests as f64 / elapsed.as_secs_f64())
    );
    println!(
        "  end to end  p50 {}  p95 {}  p99 {}  ({} jobs, {:.1} jobs/s)",
        millis(end_to_end.p50),
        millis(end_to_end.p95),
        millis(end_to_end.p99),
        jobs,
        jobs as f64 / elapsed.as_secs_f64()
    );
    println!("  errors      {}", log.errors);
    println!(
        "  seed targets: gateway p95 < 200 ms ({}), worker ≥ 5 jobs/s ({}), end-to-end p95 < 20 s ({})",
        verdict(gateway.p95 < Duration::from_millis(200)),
        verdict(jobs as f64 / elapsed.as_secs_f64() >= 5.0),
        verdict(end_to_end.p95 < Duration::from_secs(20))
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn tick(bar: ProgressBar, until: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            bar.inc(1);
        }
    })
}

/// One user: enqueue a meal, poll until it ends, again until `until`.
async fn simulate_user(
    client: reqwest::Client,
    base: String,
    token: String,
    job_type: String,
    user: usize,
    poll: Duration,
    until: Instant,
) -> UserLog {
    let mut log = UserLog::default();
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let submitted = Instant::now();
        let body =
            json!({"type": job_type, "input": {"text": format!("arroz, feijão e bife (user {user}, meal {n})")}});
        let answer = client
            .post(format!("{base}/v1/jobs"))
            .header("authorization", &token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let id = match answer {
            Ok(response) if response.status() == 202 => {
                log.gateway.push(submitted.elapsed());
                match response.bytes().await.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
                    Some(body) => body["id"].as_str().unwrap_or_default().to_string(),
                    None => {
                        log.errors += 1;
                        continue;
                    }
                }
            }
            _ => {
                log.errors += 1;
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        loop {
            tokio::time::sleep(poll).await;
            let sent = Instant::now();
            let status = client.get(format!("{base}/v1/jobs/{id}")).header("authorization", &token).send().await;
            let body = match status {
                Ok(response) if response.status() == 200 => {
                    log.gateway.push(sent.elapsed());
                    response.bytes().await.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                }
                _ => None,
            };
            match body.as_ref().and_then(|b| b["status"].as_str()) {
                Some("completed") => {
                    log.end_to_end.push(submitted.elapsed());
                    break;
                }
                Some("failed" | "cancelled") | None => {
                    log.errors += 1;
                    break;
                }
                Some(_) => {}
            }
        }
    }
    log
}

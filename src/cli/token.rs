//! `quern token`: mint an HS256 token for development and tests, and
//! `quern healthcheck`: the container's health probe.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use quern_api::auth::{PremiumRule, mint};

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The user id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// The token's role: `authenticated`, or `service_role` to see and manage every job.
    #[arg(long, default_value = "authenticated", value_parser = ["authenticated", "service_role"])]
    role: String,
    /// Mark the caller premium (may use priorities 1–4).
    #[arg(long)]
    premium: bool,
    /// How long the token is valid.
    #[arg(long, default_value_t = 24)]
    ttl_hours: u64,
    /// Signs with this secret; without it, the development secret in the data dir.
    #[arg(long, env = "QUERN_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    #[arg(long, env = "QUERN_DATA_DIR", default_value = "quern-data")]
    data_dir: PathBuf,
    #[arg(long, env = "QUERN_PREMIUM_CLAIM", default_value = "app_metadata.plan=premium")]
    premium_claim: PremiumRule,
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let secret = match args.jwt_secret {
        Some(secret) => secret.into_bytes(),
        None => {
            quern::config::dev_secret(&args.data_dir)
                .with_context(|| format!("cannot read the development secret in {}", args.data_dir.display()))?
                .0
        }
    };
    let premium = args.premium.then_some(&args.premium_claim);
    let ttl = Duration::from_secs(args.ttl_hours.saturating_mul(3600));
    println!("{}", mint(&secret, &args.user, args.role == "service_role", premium, ttl)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct HealthcheckArgs {
    /// The endpoint to ask [default: http://127.0.0.1:$QUERN_ADMIN_PORT/health/live, or $PORT without it].
    #[arg(long)]
    url: Option<String>,
    #[arg(long, env = "PORT", default_value_t = 3001)]
    port: u16,
    #[arg(long, env = "QUERN_ADMIN_PORT")]
    admin_port: Option<u16>,
    /// Ask again every 100 ms until it answers or this many seconds pass (a
    /// script waiting for `quern serve &` to come up); once without it.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

/// Exit 0 when liveness answers 200 within 3 s, 1 otherwise. Liveness asks
/// nothing of the database: a database outage is not a reason to restart
/// every container (readiness, `/health/ready`, says whether to send work).
pub fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let port = args.admin_port.unwrap_or(args.port);
    let url = args.url.unwrap_or_else(|| format!("http://127.0.0.1:{port}/health/live"));
    let deadline = Instant::now() + Duration::from_secs(args.wait.unwrap_or(0));
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
        loop {
            let problem = match client.get(&url).send().await {
                Ok(response) if response.status().is_success() => return Ok(ExitCode::SUCCESS),
                Ok(response) => format!("{url} answered {}", response.status()),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                eprintln!("unhealthy: {problem}");
                return Ok(ExitCode::FAILURE);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

//! `quern serve` (gateway + worker in one process), `quern gateway` (the
//! HTTP API alone) and `quern worker` (a worker alone): open the database,
//! load and watch the handlers, run until SIGINT/SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quern::config::{AdminArgs, DatabaseArgs, DevSecret, GatewayArgs, MaintenanceArgs, RuntimeArgs, WorkerArgs};
use quern_api::admin::{self, Probes};
use quern_api::auth::{Auth, mint};
use quern_api::metrics::Metrics;
use quern_api::{self as api, Gateway, InProcess};
use quern_queue::Queue;
use quern_queue::leader::Leader;
use quern_queue::maintenance::Maintenance;
use quern_queue::versions::VersionSync;
use quern_queue::worker::Worker;
use quern_runtime::Runtime;
use quern_runtime::registry::{DirWatch, Registry};
use quern_store::Store;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    maintenance: MaintenanceArgs,
}

#[derive(clap::Args, Debug)]
pub struct WorkerOnlyArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    maintenance: MaintenanceArgs,
    /// The admin listener's port when QUERN_ADMIN_PORT is not set (the
    /// image's health check asks PORT).
    #[arg(long, env = "PORT", default_value_t = 3001)]
    port: u16,
    #[arg(long, env = "QUERN_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Record metrics and serve them on /metrics.
    #[arg(long, env = "ENABLE_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    enable_metrics: bool,
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Also apply the Supabase compatibility set (PostgreSQL on Supabase):
    /// the seed's `analysis_jobs` view with its row-level security. Where the
    /// seed's own `analysis_jobs` table is, says how it would be moved in
    /// place (its rows imported, the table kept aside) and changes nothing
    /// without --apply.
    #[arg(long)]
    supabase: bool,
    /// Move the seed's tables (or, with --revert, move them back).
    #[arg(long, requires = "supabase")]
    apply: bool,
    /// Bring back the seed's tables that --apply moved aside, with what quern
    /// did meanwhile (a dry run without --apply).
    #[arg(long, requires = "supabase")]
    revert: bool,
}

/// The queue and the loaded handlers, shared by every serving command.
struct Host {
    queue: Arc<Queue>,
    registry: Arc<Registry>,
    /// Whether this process leads the fleet's maintenance now.
    leader: Leader,
    _watch: Option<DirWatch>,
}

/// Opens the database, loads the handlers directory (watched), applies the
/// rollouts stored in the database, and keeps following them until `stop`.
async fn start_host(
    runtime: &RuntimeArgs,
    database: &DatabaseArgs,
    worker: &WorkerArgs,
    maintenance: &MaintenanceArgs,
    stop: &CancellationToken,
) -> anyhow::Result<Host> {
    let store = open_store(runtime, database).await?;
    let mut settings = runtime.settings()?;
    settings.max_instances = worker.concurrency * 2 + 4;
    let registry = Registry::new(Arc::new(Runtime::new(settings)?));
    let dir = &worker.handlers_dir;
    let watch = if dir.is_dir() {
        for (path, result) in registry.load_dir(dir)? {
            if let Ok(handler) = result {
                tracing::info!(path = %path.display(), job_type = %handler.manifest.job_type, version = %handler.version, world = handler.world(), "handler loaded");
            }
        }
        Some(registry.watch(dir).with_context(|| format!("cannot watch {}", dir.display()))?)
    } else {
        tracing::warn!(dir = %dir.display(), "no handlers directory: build the handlers with `cargo xtask build-handlers` or set QUERN_HANDLERS_DIR");
        None
    };
    let versions = VersionSync::new(store.clone(), registry.clone());
    if let Err(error) = versions.sync().await {
        tracing::warn!(%error, "cannot read the handler rollouts yet; following them once the database answers");
    }
    let leader = Leader::elect(store.clone(), stop.clone());
    versions.spawn(leader.clone(), stop.clone());
    let queue = Arc::new(Queue::new(store, worker.queue_settings()));
    let upkeep = maintenance.settings(std::time::Duration::from_millis(worker.poll_interval_ms));
    Maintenance::new(queue.clone(), upkeep).spawn(leader.clone(), stop.clone());
    Ok(Host { queue, registry, leader, _watch: watch })
}

/// `quern serve` (`with_worker`) or `quern gateway`.
pub fn serve(args: ServeArgs, with_worker: bool) -> anyhow::Result<ExitCode> {
    // Handlers run on threads of their own: a guest that spins until its
    // deadline takes a job thread, never one that answers HTTP. (Kept
    // until the server has stopped: connections opened on it serve both.)
    let jobs = job_runtime()?;
    let served = tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        let host = start_host(&args.runtime, &args.database, &args.worker, &args.maintenance, &shutdown).await?;
        let (auth_settings, dev) = args
            .gateway
            .auth_settings(&args.runtime.data_dir)
            .context("cannot read or create the development JWT secret")?;
        let dev_secret = (dev != DevSecret::None).then(|| auth_settings.hs256_secret.clone()).flatten();
        let premium = auth_settings.premium.clone();
        let auth = Auth::new(auth_settings)?;
        if dev != DevSecret::None {
            tracing::warn!(
                path = %args.runtime.data_dir.join("jwt-secret").display(),
                "no QUERN_JWT_SECRET or QUERN_JWKS_URL: tokens are checked against a development secret"
            );
        }
        let worker =
            with_worker.then(|| Worker::new(host.queue.clone(), host.registry.clone(), args.worker.worker_settings()));
        let gateway = Gateway::new(
            host.queue.clone(),
            host.registry.clone(),
            auth,
            args.gateway.settings(),
            InProcess {
                worker: worker.as_ref().map(Worker::probe),
                metrics: if args.gateway.enable_metrics { Metrics::install() } else { None },
                metrics_token: args.admin.metrics_token(),
                leader: host.leader.clone(),
            },
            shutdown.clone(),
        );
        let gateway_probes = gateway.probes.clone();
        let (router, _) = api::router(gateway);
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.gateway.bind, args.gateway.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.gateway.bind, args.gateway.port))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, worker = with_worker, "gateway listening");
        if let (DevSecret::Created, Some(secret)) = (dev, dev_secret) {
            print_first_start(addr, &secret, &premium)?;
        }
        let server = tokio::spawn(api::serve(listener, router, args.gateway.settings().server, shutdown.clone()));
        let admin = match args.admin.admin_port {
            Some(port) => Some(serve_admin(args.gateway.bind, port, gateway_probes, &shutdown).await?),
            None => None,
        };
        if let Some(worker) = worker {
            jobs.spawn(worker.run(shutdown.clone())).await??;
        } else {
            shutdown.cancelled().await;
        }
        server.await??;
        if let Some(admin) = admin {
            admin.await??;
        }
        Ok(ExitCode::SUCCESS)
    });
    // The worker has drained; wait for the job threads to end too, so that
    // nothing logs after the log writer has flushed and closed at exit.
    jobs.shutdown_timeout(Duration::from_secs(5));
    served
}

/// The runtime jobs run on, apart from the one serving HTTP: as many threads
/// as cores, so the operating system shares the cores between both fairly
/// however long a guest computes without yielding.
fn job_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().thread_name("quern-job").enable_all().build()
}

/// `quern worker`: the worker, and the admin listener an orchestrator and
/// Prometheus ask.
pub fn worker(args: WorkerOnlyArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        let host = start_host(&args.runtime, &args.database, &args.worker, &args.maintenance, &shutdown).await?;
        let worker = Worker::new(host.queue.clone(), host.registry.clone(), args.worker.worker_settings());
        let probes = Arc::new(Probes {
            store: host.queue.store().clone(),
            registry: host.registry.clone(),
            metrics: if args.enable_metrics { Metrics::install() } else { None },
            metrics_token: args.admin.metrics_token(),
            started: std::time::Instant::now(),
            worker: Some(worker.probe()),
        });
        let port = args.admin.admin_port.unwrap_or(args.port);
        let admin = serve_admin(args.bind, port, probes, &shutdown).await?;
        worker.run(shutdown).await?;
        admin.await??;
        Ok(ExitCode::SUCCESS)
    })
}

/// Serves `/health/live`, `/health/ready` and `/metrics` on `bind:port` until `shutdown`.
async fn serve_admin(
    bind: IpAddr,
    port: u16,
    probes: Arc<Probes>,
    shutdown: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind, port)).await.with_context(|| {
        format!(
            "cannot listen on {bind}:{port} for /health and /metrics: set QUERN_ADMIN_PORT to a free port (0 picks one)"
        )
    })?;
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    let settings = api::server::ServerSettings::default();
    Ok(tokio::spawn(api::serve(listener, admin::router(probes), settings, shutdown.clone())))
}

/// The first start on an empty data dir: a ready token and a request to try.
fn print_first_start(addr: SocketAddr, secret: &[u8], premium: &api::auth::PremiumRule) -> anyhow::Result<()> {
    let host = if addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { addr.ip() };
    let base = format!("http://{}", SocketAddr::new(host, addr.port()));
    let token = mint(secret, "dev", false, Some(premium), Duration::from_secs(30 * 24 * 3600))?;
    println!(
        "\nquern is ready on {base}\n\n\
         A development token (user `dev`, premium, valid 30 days; `quern token --user <id>` mints more):\n\n  \
         export QUERN_TOKEN={token}\n\n\
         Try it:\n\n  \
         curl -s '{base}/v1/jobs?wait=10' -H \"Authorization: Bearer $QUERN_TOKEN\" \\\n       \
         -H 'Content-Type: application/json' -d '{{\"type\": \"echo\", \"input\": {{\"hello\": \"world\"}}}}'\n\n\
         Set QUERN_JWT_SECRET (your Supabase JWT secret) or QUERN_JWKS_URL in production.\n"
    );
    Ok(())
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let url = args.database.url(&args.runtime.data_dir);
        if args.supabase {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                anyhow::bail!(
                    "--supabase needs DATABASE_URL=postgres://… (the view and row-level security are PostgreSQL's)"
                );
            }
            let store = quern_store::PostgresStore::connect(&url).await.context("cannot open the database")?;
            store.migrate().await?;
            return super::seed_schema::migrate_supabase(&store, args.apply, args.revert).await;
        }
        let store = quern_store::connect(&url).await.context("cannot open the database")?;
        store.migrate().await?;
        eprintln!("migrations applied ({})", store.backend());
        Ok(ExitCode::SUCCESS)
    })
}

async fn open_store(runtime: &RuntimeArgs, database: &DatabaseArgs) -> anyhow::Result<Arc<dyn Store>> {
    let store = database.connect(&runtime.data_dir).await.context("cannot open the database")?;
    if database.no_migrate {
        store.check_migrated().await?;
    } else {
        store.migrate().await?;
    }
    tracing::info!(backend = store.backend(), "database ready");
    Ok(store)
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn shutdown_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops quern gracefully");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}

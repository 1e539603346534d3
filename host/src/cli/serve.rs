//! `quern serve` and `quern worker`: open the database, load and watch the
//! handlers, run a worker until SIGINT/SIGTERM. (`serve` adds the HTTP gateway
//! once it exists; today both run the worker.)

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use quern::config::{DatabaseArgs, RuntimeArgs, WorkerArgs};
use quern::queue::Queue;
use quern::queue::worker::Worker;
use quern::runtime::Runtime;
use quern::runtime::registry::Registry;
use quern::store::Store;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    worker: WorkerArgs,
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let store = open_store(&args.runtime, &args.database).await?;
        let mut settings = args.runtime.settings()?;
        settings.max_instances = args.worker.concurrency * 2 + 4;
        let runtime = Arc::new(Runtime::new(settings)?);
        let registry = Registry::new(runtime);
        let dir = &args.worker.handlers_dir;
        let _watch = if dir.is_dir() {
            for (path, result) in registry.load_dir(dir)? {
                if let Ok(handler) = result {
                    tracing::info!(path = %path.display(), job_type = %handler.manifest.job_type, version = %handler.version, "handler loaded");
                }
            }
            Some(registry.watch(dir).with_context(|| format!("cannot watch {}", dir.display()))?)
        } else {
            tracing::warn!(dir = %dir.display(), "no handlers directory: build the handlers with `cargo xtask build-handlers` or set QUERN_HANDLERS_DIR");
            None
        };
        let queue = Arc::new(Queue::new(store, args.worker.queue_settings()));
        let worker = Worker::new(queue, registry, args.worker.worker_settings());
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        worker.run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let url = args.database.url(&args.runtime.data_dir);
        let store = quern::store::connect(&url).await.context("cannot open the database")?;
        store.migrate().await?;
        eprintln!("migrations applied ({})", store.backend());
        Ok(ExitCode::SUCCESS)
    })
}

async fn open_store(runtime: &RuntimeArgs, database: &DatabaseArgs) -> anyhow::Result<Arc<dyn Store>> {
    let url = database.url(&runtime.data_dir);
    let store = quern::store::connect(&url).await.context("cannot open the database")?;
    if !database.no_migrate {
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

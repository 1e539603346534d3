//! Command-line glue: parse, set up, dispatch. Work lives in the library.

mod jobs;
mod run;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Exit codes of `quern run`, and of any command that fails before a job runs.
pub const EXIT_RETRY: u8 = 1;
pub const EXIT_FAILED: u8 = 2;
pub const EXIT_HOST_ERROR: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "quern", version, about = "A job host: every job type a sandboxed WebAssembly component")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one handler component once, in isolation: result JSON on stdout,
    /// logs and progress on stderr. Exit 0 ok, 1 retryable failure, 2 permanent
    /// failure, 3 host or usage error.
    Run(run::RunArgs),
    /// Run the job host: a worker on the embedded SQLite database by default
    /// (DATABASE_URL=postgres://… for PostgreSQL), handlers from QUERN_HANDLERS_DIR.
    Serve(serve::ServeArgs),
    /// Run a worker only (several may share one PostgreSQL database).
    Worker(serve::ServeArgs),
    /// Enqueue, inspect and cancel jobs in the database.
    Jobs(jobs::JobsArgs),
    /// Apply the database migrations and exit.
    Migrate(serve::MigrateArgs),
    /// Measure; print the numbers.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Per-job cost of a fresh sandbox: instantiate, call, drop.
    Runtime(quern::bench::runtime::RuntimeBenchArgs),
    /// The queue end to end: enqueue and processing throughput, pickup latency.
    Queue(quern::bench::queue::QueueBenchArgs),
}

/// Logs go to stderr; `QUERN_LOG` filters them (e.g. `debug`, `quern=trace`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_env("QUERN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Serve(args) | Command::Worker(args) => serve::serve(args),
        Command::Migrate(args) => serve::migrate(args),
        Command::Jobs(args) => jobs::jobs(args),
        Command::Bench(BenchCommand::Queue(args)) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(quern::bench::queue::run(&args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Runtime(args)) => {
            quern::bench::runtime::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

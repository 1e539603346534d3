//! Command-line glue: parse, set up, dispatch. Work lives in the library.

mod handlers;
mod jobs;
mod new;
mod run;
mod seed_schema;
mod serve;
mod token;

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
    /// Scaffold a handler crate: `handlers/<type>` with its manifest, a typed
    /// input and output, a unit test and a harness test.
    New(new::NewArgs),
    /// Run one handler component once, in isolation: result JSON on stdout,
    /// logs and progress on stderr. Exit 0 ok, 1 retryable failure, 2 permanent
    /// failure, 3 host or usage error.
    Run(run::RunArgs),
    /// Run the job host: the HTTP gateway and a worker, on the embedded SQLite
    /// database by default (DATABASE_URL=postgres://… for PostgreSQL), handlers
    /// from QUERN_HANDLERS_DIR.
    Serve(serve::ServeArgs),
    /// Run the HTTP gateway only (workers run elsewhere, on the same PostgreSQL).
    Gateway(serve::ServeArgs),
    /// Run a worker only (several may share one PostgreSQL database).
    Worker(serve::WorkerOnlyArgs),
    /// Mint a token for development and tests.
    Token(token::TokenArgs),
    /// Exit 0 when this host's /health/live answers 200 (the container health check of serve, gateway and worker).
    Healthcheck(token::HealthcheckArgs),
    /// Enqueue, inspect and cancel jobs in the database.
    Jobs(jobs::JobsArgs),
    /// Upload, roll out, roll back and pause handler versions across every worker.
    Handlers(handlers::HandlersArgs),
    /// Apply the database migrations and exit.
    Migrate(serve::MigrateArgs),
    /// Measure; print the numbers.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(quern::bench::BenchCommand),
    /// Benchmarks are built only with the feature `bench`.
    #[cfg(not(feature = "bench"))]
    #[command(hide = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

impl Cli {
    /// Long-running servers log JSON lines for a log collector; one-off
    /// commands, and a server whose stderr is a terminal (someone is reading
    /// it), log plain text. `QUERN_LOG_FORMAT` decides when set.
    pub fn logs_json(&self) -> bool {
        use std::io::IsTerminal;
        let server = matches!(self.command, Command::Serve(_) | Command::Gateway(_) | Command::Worker(_));
        match std::env::var("QUERN_LOG_FORMAT").as_deref() {
            Ok("json") => true,
            Ok("text") => false,
            _ => server && !std::io::stderr().is_terminal(),
        }
    }
}

/// The environment variable an invalid value came from, when it came from
/// one: clap names the flag (`--lease-ms`), while a container sets
/// `QUERN_LEASE_MS`.
pub fn env_behind(error: &clap::Error) -> Option<String> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) =
        (error.get(ContextKind::InvalidArg), error.get(ContextKind::InvalidValue))
    else {
        return None;
    };
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    fn find_env(command: &clap::Command, long: &str) -> Option<std::ffi::OsString> {
        command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long))
            .and_then(|arg| arg.get_env().map(std::ffi::OsStr::to_os_string))
            .or_else(|| command.get_subcommands().find_map(|sub| find_env(sub, long)))
    }
    let variable = find_env(&Cli::command(), long)?;
    let set = std::env::var_os(&variable)?;
    (set.to_string_lossy() == *value).then(|| format!("{}={value}", variable.to_string_lossy()))
}

/// Logs go to stderr; `QUERN_LOG` (or `LOG_LEVEL`) filters them (e.g. `debug`,
/// `quern=trace`); `QUERN_LOG_FORMAT` is `json` or `text`. JSON lines carry the
/// request's id from the span they were logged in. Servers write through a
/// background thread, so a slow stderr never holds up a request; the
/// returned guard flushes it when dropped at exit.
pub fn init_logging(json: bool) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = EnvFilter::try_from_env("QUERN_LOG")
        .or_else(|_| EnvFilter::try_from_env("LOG_LEVEL"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    if json {
        let (writer, guard) =
            tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).with_writer(writer).init();
        Some(guard)
    } else {
        builder.with_writer(std::io::stderr).init();
        None
    }
}

/// Runs a benchmark to its end on a runtime of its own.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::New(args) => new::new(args),
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::serve(args, true),
        Command::Gateway(args) => serve::serve(args, false),
        Command::Worker(args) => serve::worker(args),
        Command::Token(args) => token::token(args),
        Command::Healthcheck(args) => token::healthcheck(args),
        Command::Migrate(args) => serve::migrate(args),
        Command::Jobs(args) => jobs::jobs(args),
        Command::Handlers(args) => handlers::handlers(args),
        #[cfg(feature = "bench")]
        Command::Bench(command) => {
            quern::bench::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "bench"))]
        Command::Bench { .. } => {
            anyhow::bail!(
                "this quern was built without benchmarks: build it with `cargo build --release --features bench`"
            )
        }
    }
}

//! The `quern` command.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(error) => {
            // Help and version are not errors; a usage error is a host error (3).
            let _ = error.print();
            if let Some(variable) = cli::env_behind(&error) {
                eprintln!("The value comes from the environment: fix or unset {variable}.");
            }
            return if error.use_stderr() { cli::EXIT_HOST_ERROR.into() } else { ExitCode::SUCCESS };
        }
    };
    let _flush_logs_at_exit = cli::init_logging(args.logs_json());
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            cli::EXIT_HOST_ERROR.into()
        }
    }
}

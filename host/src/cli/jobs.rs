//! `quern jobs …`: enqueue, inspect and cancel jobs straight in the database
//! (the HTTP API is the way for applications; this is for operators).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use quern::config::{DatabaseArgs, WorkerArgs};
use quern::queue::{EnqueueRequest, Queue};
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    #[command(subcommand)]
    command: JobsCommand,
    /// Where quern keeps its data (the default SQLite database is here).
    #[arg(long, env = "QUERN_DATA_DIR", default_value = "quern-data", global = true)]
    data_dir: PathBuf,
    #[command(flatten)]
    database: DatabaseArgs,
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// Enqueue a job and print it; `--wait` follows it to its end.
    Enqueue {
        job_type: String,
        #[arg(long, default_value = "{}")]
        input: String,
        #[arg(long, default_value = "cli")]
        user: String,
        #[arg(long)]
        priority: Option<i64>,
        /// Wait up to this many seconds for the job to end.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Print a job with its attempts.
    Get { id: Uuid },
    /// Cancel a pending or running job.
    Cancel { id: Uuid },
}

pub fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let store =
            quern::store::connect(&args.database.url(&args.data_dir)).await.context("cannot open the database")?;
        if !args.database.no_migrate {
            store.migrate().await?;
        }
        let queue = Queue::new(store.clone(), queue_defaults());
        match args.command {
            JobsCommand::Enqueue { job_type, input, user, priority, wait } => {
                let input = serde_json::from_str(&input).context("--input is not valid JSON")?;
                let job = queue
                    .enqueue(EnqueueRequest { user_id: user, job_type, input, priority, ..Default::default() })
                    .await?;
                let Some(seconds) = wait else {
                    println!("{}", serde_json::to_string_pretty(&job)?);
                    return Ok(ExitCode::SUCCESS);
                };
                let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
                loop {
                    let current = store.get(job.id).await?.context("the job vanished")?;
                    if current.status.is_finished() || tokio::time::Instant::now() >= deadline {
                        println!("{}", serde_json::to_string_pretty(&current)?);
                        return Ok(if current.status == quern::store::JobStatus::Completed {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(2)
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            JobsCommand::Get { id } => {
                let job = store.get(id).await?.with_context(|| format!("job {id} not found"))?;
                let attempts = store.attempts(id).await?;
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "job": job, "attempts": attempts }))?);
                Ok(ExitCode::SUCCESS)
            }
            JobsCommand::Cancel { id } => {
                let outcome = queue.cancel(id).await?;
                println!("{outcome:?}");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// The queue settings `quern serve` would use, from the same environment.
fn queue_defaults() -> quern::queue::QueueSettings {
    use clap::Parser;
    #[derive(Parser)]
    struct Env {
        #[command(flatten)]
        worker: WorkerArgs,
    }
    Env::try_parse_from(["quern"]).map(|env| env.worker.queue_settings()).unwrap_or_default()
}

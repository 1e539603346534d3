//! `quern jobs …`: enqueue, inspect and cancel jobs straight in the database
//! (the HTTP API is the way for applications; this is for operators).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use quern::config::{DatabaseArgs, WorkerArgs};
use quern_queue::{EnqueueRequest, Queue};
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
    /// Enqueue a job and print it; `--wait` follows it to its end. With
    /// `--file`, enqueue every job of a file instead, a thousand per
    /// transaction, and print their ids.
    Enqueue {
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        job_type: Option<String>,
        /// A JSON array of jobs, or one job per line (JSON Lines), each
        /// `{"type": …, "input": {…}}` with optional `priority`, `user_id`
        /// and `next`; `-` reads standard input.
        #[arg(long, conflicts_with_all = ["input", "priority", "wait"])]
        file: Option<PathBuf>,
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
        let store = args.database.connect(&args.data_dir).await.context("cannot open the database")?;
        // An operator's look into a database never changes its schema.
        store.check_migrated().await?;
        let queue = Queue::new(store.clone(), queue_defaults());
        match args.command {
            JobsCommand::Enqueue { file: Some(file), user, .. } => enqueue_file(&queue, &file, &user).await,
            JobsCommand::Enqueue { job_type: Some(job_type), input, user, priority, wait, file: None } => {
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
                        return Ok(if current.status == quern_store::JobStatus::Completed {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(2)
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            JobsCommand::Enqueue { job_type: None, file: None, .. } => {
                anyhow::bail!("name a job type, or --file with jobs to enqueue")
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

/// One job of a `--file`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJob {
    #[serde(rename = "type")]
    job_type: String,
    input: serde_json::Value,
    priority: Option<i64>,
    user_id: Option<String>,
    #[serde(default)]
    next: Vec<quern_store::Step>,
}

/// Reads every job of the file, checks them all, then enqueues them a
/// batch per transaction: a file with one bad job enqueues nothing.
async fn enqueue_file(queue: &Queue, path: &std::path::Path, user: &str) -> anyhow::Result<ExitCode> {
    let text = if path == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let jobs =
        parse_jobs(&text).with_context(|| format!("{} is not a JSON array of jobs nor JSON Lines", path.display()))?;
    let requests: Vec<EnqueueRequest> = jobs
        .into_iter()
        .map(|job| EnqueueRequest {
            user_id: job.user_id.unwrap_or_else(|| user.to_string()),
            job_type: job.job_type,
            input: job.input,
            priority: job.priority,
            next: job.next,
            max_attempts: None,
        })
        .collect();
    let jobs = match queue.validate_batch(requests) {
        Ok(jobs) => jobs,
        Err(quern_queue::BatchError::Invalid(invalid)) => {
            for (index, error) in &invalid {
                eprintln!("job {} (from 1): {error}", index + 1);
            }
            anyhow::bail!("{} of the jobs are invalid; nothing was enqueued", invalid.len());
        }
        Err(error) => return Err(error.into()),
    };
    let mut enqueued = 0;
    for batch in jobs.chunks(quern_queue::MAX_BATCH) {
        queue.insert_batch(batch).await.with_context(|| {
            format!("enqueued {enqueued} of {} jobs, then the database refused the next batch", jobs.len())
        })?;
        enqueued += batch.len();
        for job in batch {
            println!("{}", job.id);
        }
    }
    eprintln!("enqueued {enqueued} jobs");
    Ok(ExitCode::SUCCESS)
}

/// A JSON array of jobs, or JSON Lines (blank lines skipped); errors name
/// the line.
fn parse_jobs(text: &str) -> anyhow::Result<Vec<FileJob>> {
    if text.trim_start().starts_with('[') {
        return Ok(serde_json::from_str(text)?);
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).with_context(|| format!("line {}", n + 1)))
        .collect()
}

/// The queue settings `quern serve` would use, from the same environment.
fn queue_defaults() -> quern_queue::QueueSettings {
    use clap::Parser;
    #[derive(Parser)]
    struct Env {
        #[command(flatten)]
        worker: WorkerArgs,
    }
    Env::try_parse_from(["quern"]).map(|env| env.worker.queue_settings()).unwrap_or_default()
}

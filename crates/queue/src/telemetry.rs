//! The names of the job lifecycle's metrics, in one place (the sandbox's are in
//! `quern_runtime::telemetry`, the gateway's own beside its middleware). Every
//! module records through the `metrics` facade with these names; the gateway
//! installs a Prometheus recorder and serves `/metrics`. Without a recorder
//! (tests, `quern run`) recording costs nothing.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const JOBS_ENQUEUED: &str = "quern_jobs_enqueued_total";
pub const JOBS_COMPLETED: &str = "quern_jobs_completed_total";
pub const JOBS_FAILED: &str = "quern_jobs_failed_total";
pub const JOBS_RETRIED: &str = "quern_jobs_retried_total";
pub const JOBS_CANCELLED: &str = "quern_jobs_cancelled_total";
pub const JOB_DURATION: &str = "quern_job_duration_seconds";
pub const JOB_PICKUP: &str = "quern_job_pickup_latency_seconds";
pub const JOB_LATENCY: &str = "quern_job_latency_seconds";
pub const WORKERS_UNSEEN: &str = "quern_workers_unseen_seconds";
pub const QUEUE_DEPTH: &str = "quern_queue_jobs";
pub const CACHE_HITS: &str = "quern_cache_hits_total";
pub const CACHE_MISSES: &str = "quern_cache_misses_total";
pub const ALERTS_ACTIVE: &str = "quern_alerts_active";
pub const ALERTS_FIRED: &str = "quern_alerts_fired_total";
pub const WORKERS_OFFLINE: &str = "quern_workers_offline";
pub const CANARY_ROLLBACKS: &str = "quern_canary_rollbacks_total";
pub const COMPLETION_BATCH: &str = "quern_completion_batch_size";
pub const ENQUEUE_BATCH: &str = "quern_enqueue_batch_size";

/// Help texts for `/metrics`, registered once with the recorder.
pub fn describe() {
    quern_runtime::telemetry::describe();
    describe_counter!(JOBS_ENQUEUED, "Jobs accepted by the gateway, by type.");
    describe_counter!(JOBS_COMPLETED, "Job attempts that completed, by type.");
    describe_counter!(JOBS_FAILED, "Jobs that failed for good, by type.");
    describe_counter!(JOBS_RETRIED, "Job attempts that will run again, by type.");
    describe_counter!(JOBS_CANCELLED, "Jobs cancelled, by type.");
    describe_histogram!(JOB_DURATION, Unit::Seconds, "Time one attempt ran in a worker, by type.");
    describe_histogram!(JOB_PICKUP, Unit::Seconds, "Time from a job being due to a worker claiming it, by type.");
    describe_histogram!(
        JOB_LATENCY,
        Unit::Seconds,
        "Time from enqueue to the end of jobs that completed, waiting included (the latency the slow_jobs alert judges), by type."
    );
    describe_gauge!(QUEUE_DEPTH, "Unfinished jobs, by type and status (pending, processing).");
    describe_counter!(CACHE_HITS, "Enqueues answered from the result cache, by type.");
    describe_counter!(CACHE_MISSES, "Enqueues of cacheable types that missed the cache, by type.");
    describe_gauge!(
        ALERTS_ACTIVE,
        "Alerts firing now, by alert (queue_backlog, worker_offline, failure_rate, slow_jobs)."
    );
    describe_counter!(ALERTS_FIRED, "Alerts that started, by alert.");
    describe_histogram!(COMPLETION_BATCH, "Attempt ends a worker wrote with one statement and one commit.");
    describe_histogram!(
        ENQUEUE_BATCH,
        "Enqueues from separate callers written with one commit (only batches of two or more)."
    );
    describe_gauge!(WORKERS_OFFLINE, "Workers whose last heartbeat is older than the offline threshold.");
    describe_gauge!(
        WORKERS_UNSEEN,
        "Seconds since any worker was last seen beating (since the judge started, when none ever was)."
    );
    describe_counter!(
        CANARY_ROLLBACKS,
        "Canaries rolled back by themselves for failing more than the active version, by type."
    );
}

//! `quern:handler/host.progress`: a job's progress, handed to whoever runs it.
//!
//! Per job: an optional [`ProgressSink`]. The queue persists what it receives
//! (throttled); `quern run` prints it to stderr.

use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub job_id: Arc<str>,
    pub percent: u8,
    pub message: String,
}

/// Receives a job's progress reports. Called on the job's task: keep it quick.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

const MAX_MESSAGE_BYTES: usize = 1 << 10;

pub fn report(sink: Option<&ProgressSink>, job_id: &Arc<str>, percent: u8, message: &str) {
    if let Some(sink) = sink {
        let message = super::log::truncate(message, MAX_MESSAGE_BYTES).to_string();
        sink(Progress { job_id: job_id.clone(), percent: percent.min(100), message });
    }
}

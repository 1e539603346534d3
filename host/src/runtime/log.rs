//! `quern:handler/host.log`: a handler's log lines, into the host's `tracing`.
//!
//! Per job: [`JobLabels`], the job id, type and handler version every line is
//! tagged with. Messages are truncated so a handler cannot flood the log.

use std::sync::Arc;

/// The fields every line of a job carries.
#[derive(Debug, Clone)]
pub struct JobLabels {
    pub job_id: Arc<str>,
    pub job_type: Arc<str>,
    pub version: Arc<str>,
}

const MAX_MESSAGE_BYTES: usize = 8 << 10;

pub fn write(labels: &JobLabels, level: &str, message: &str) {
    let message = truncate(message, MAX_MESSAGE_BYTES);
    let (job_id, job_type, version) = (&*labels.job_id, &*labels.job_type, &*labels.version);
    match level.to_ascii_lowercase().as_str() {
        "trace" => tracing::trace!(target: "handler", job_id, job_type, version, "{message}"),
        "debug" => tracing::debug!(target: "handler", job_id, job_type, version, "{message}"),
        "warn" | "warning" => tracing::warn!(target: "handler", job_id, job_type, version, "{message}"),
        "error" => tracing::error!(target: "handler", job_id, job_type, version, "{message}"),
        _ => tracing::info!(target: "handler", job_id, job_type, version, "{message}"),
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

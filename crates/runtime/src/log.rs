//! `quern:handler/host.log`: a handler's log lines, into the host's `tracing`.
//!
//! Per job: [`JobLabels`], the job id, type and handler version every line is
//! tagged with, and a [`LogBudget`] that `host.log`, stdout and stderr share:
//! past it, lines are dropped and counted, so a handler cannot flood the log.

use std::sync::Arc;

/// The fields every line of a job carries.
#[derive(Debug, Clone)]
pub struct JobLabels {
    pub job_id: Arc<str>,
    pub job_type: Arc<str>,
    pub version: Arc<str>,
}

const MAX_MESSAGE_BYTES: usize = 8 << 10;

/// The log lines one job may write: this many lines and bytes, whatever the
/// stream.
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    bytes: usize,
    dropped: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self { lines: 200, bytes: 64 << 10, dropped: 0 }
    }
}

impl LogBudget {
    /// Spends the budget on a line of `bytes`; `false` (and counted) past it.
    pub fn admit(&mut self, bytes: usize) -> bool {
        if self.lines == 0 || bytes > self.bytes {
            self.dropped += 1;
            return false;
        }
        self.lines -= 1;
        self.bytes -= bytes;
        true
    }

    /// Says once, at the job's end, how many lines were dropped.
    pub fn report(&self, labels: &JobLabels) {
        if self.dropped == 0 {
            return;
        }
        let (job_id, job_type, version) = (&*labels.job_id, &*labels.job_type, &*labels.version);
        tracing::warn!(target: "handler", job_id, job_type, version, dropped = self.dropped, "the handler wrote more than a job may log; the rest was dropped");
        metrics::counter!(crate::telemetry::LOG_LINES_DROPPED, "type" => job_type.to_string()).increment(self.dropped);
    }
}

pub fn write(labels: &JobLabels, budget: &mut LogBudget, level: &str, message: &str) {
    let message = truncate(message, MAX_MESSAGE_BYTES);
    if !budget.admit(message.len()) {
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_logs_at_most_its_budget_of_lines_and_bytes() {
        let mut budget = LogBudget::default();
        let admitted = (0..1000).filter(|_| budget.admit(10)).count();
        assert_eq!((admitted, budget.dropped), (200, 800));
        let mut budget = LogBudget::default();
        let admitted = (0..100).filter(|_| budget.admit(8 << 10)).count();
        assert_eq!(admitted, 8, "64 KiB of 8 KiB lines");
    }
}

//! The names of the sandbox's metrics. Recording without a recorder (tests,
//! `quern run`) costs nothing; the gateway describes them for `/metrics`.

use metrics::{Unit, describe_counter, describe_histogram};

pub const OUTBOUND_CALLS: &str = "quern_outbound_requests_total";
pub const INSTANCE_TIME: &str = "quern_instance_seconds";
pub const LOG_LINES_DROPPED: &str = "quern_handler_log_lines_dropped_total";

/// Help texts for `/metrics`, registered once with the recorder.
pub fn describe() {
    describe_counter!(OUTBOUND_CALLS, "Outbound HTTP requests made for handlers, by host and status.");
    describe_histogram!(INSTANCE_TIME, Unit::Seconds, "Wall time of a handler instance per attempt, by type.");
    describe_counter!(
        LOG_LINES_DROPPED,
        "Handler log lines (host.log, stdout, stderr) dropped past a job's budget, by type."
    );
}

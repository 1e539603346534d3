//! The 0.1 world on top of the 0.2 one. A 0.1 component's imports are served
//! by the same capabilities as a 0.2 component's: each call converts its
//! arguments to 0.2 and its answer back, so both worlds share one policy, one
//! HTTP path and one log. What 0.1 lacks (the deadline in `job`) is dropped;
//! what it had as text (a method, a log level) is passed on as that text.

use super::bindings::v0_1::quern::handler::{host, http, types};
use super::bindings::v0_2::quern::handler::http as http_v0_2;
use super::bindings::{Failure, Job, Method};
use super::state::JobState;

impl types::Host for JobState {}

impl host::Host for JobState {
    fn log(&mut self, level: String, message: String) {
        super::log::write(&self.labels, &mut self.log_budget, &level, &message);
    }

    fn progress(&mut self, percent: u8, message: String) {
        super::progress::report(self.progress.as_ref(), &self.labels.job_id, percent, &message);
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key)
    }
}

impl http::Host for JobState {
    async fn send(&mut self, request: http::Request) -> Result<http::Response, http::Error> {
        let request = http_v0_2::Request {
            // 0.1 sent every method upper-cased, `get` as `GET`: as `other`,
            // the name is sent as given, so upper-casing it keeps that.
            method: Method::Other(request.method.to_ascii_uppercase()),
            url: request.url,
            headers: request.headers,
            body: request.body,
            timeout_ms: request.timeout_ms,
            idempotent: request.idempotent,
        };
        match <Self as http_v0_2::Host>::send(self, request).await {
            Ok(response) => {
                Ok(http::Response { status: response.status, headers: response.headers, body: response.body })
            }
            Err(error) => Err(error_v0_1(error)),
        }
    }
}

fn error_v0_1(error: http_v0_2::Error) -> http::Error {
    use http_v0_2::Error as E;
    match error {
        E::Denied(m) => http::Error::Denied(m),
        E::InvalidRequest(m) => http::Error::InvalidRequest(m),
        E::Connect(m) => http::Error::Connect(m),
        E::Timeout(m) => http::Error::Timeout(m),
        E::Protocol(m) => http::Error::Protocol(m),
        E::BodyTooLarge(m) => http::Error::BodyTooLarge(m),
    }
}

/// The job as a 0.1 handler receives it.
pub fn job(job: &Job) -> types::Job {
    types::Job {
        id: job.id.clone(),
        job_type: job.job_type.clone(),
        input: job.input.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
    }
}

/// A 0.1 handler's failure, as 0.2 names it.
pub fn failure(failure: types::Failure) -> Failure {
    match failure {
        types::Failure::Fail(reason) => Failure::Fail(reason),
        types::Failure::Retry(retry) => Failure::Retry(super::bindings::v0_2::quern::handler::types::Retry {
            reason: retry.reason,
            delay_ms: retry.delay_ms,
        }),
    }
}

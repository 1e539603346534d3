//! Write quern job handlers.
//!
//! A handler is a WebAssembly component built from a crate like this one:
//!
//! ```ignore
//! use quern_sdk::{Failure, Handler, JobInfo};
//!
//! #[derive(serde::Deserialize)]
//! struct Input { name: String }
//!
//! struct Greet;
//! impl Handler for Greet {
//!     type Input = Input;
//!     type Output = serde_json::Value;
//!     fn handle(_job: &JobInfo, input: Input) -> Result<Self::Output, Failure> {
//!         Ok(serde_json::json!({ "greeting": format!("hello, {}", input.name) }))
//!     }
//! }
//! quern_sdk::export_handler!(Greet);
//! ```
//!
//! Input that does not deserialize into `Handler::Input` fails the job
//! permanently with `invalid input: …` naming the field and what was
//! expected, never the value (an input can carry personal data, and the
//! error is stored and shown), so handlers only ever see well-formed input. Everything except [`run`] and [`parse_input`] calls
//! into the host and so only works inside quern; keep pure logic in plain
//! functions and test it with `cargo test` on the host target.

pub mod http;
pub mod input;
mod log;

/// The generated bindings of the `quern:handler@0.2.0` world. The crate's
/// `wit/` is the repository's (a link, resolved when the crate is packaged),
/// so a published SDK carries the world it was built against.
#[allow(clippy::too_many_arguments)] // generated
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "quern:handler/handler",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "quern_sdk::bindings",
    });
}

pub use bindings::quern::handler::host::Level;
pub use bindings::quern::handler::types::{Failure, Job, Retry};
pub use serde_json;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a handler knows of the job it runs, besides its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    pub job_type: String,
    pub attempt: u32,
    pub max_attempts: u32,
    /// When the host stops this attempt, in Unix milliseconds; see
    /// [`JobInfo::remaining`].
    pub deadline_unix_ms: u64,
}

impl JobInfo {
    /// Whether this is the job's last attempt: a `retry` now ends it as failed.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// The time left before the host stops this attempt (zero once past):
    /// give an upstream no longer than this, and fail cleanly instead of
    /// being cut off.
    pub fn remaining(&self) -> std::time::Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        std::time::Duration::from_millis(self.deadline_unix_ms.saturating_sub(now))
    }
}

/// A job type: typed input in, typed output out.
pub trait Handler {
    type Input: DeserializeOwned;
    type Output: Serialize;
    fn handle(job: &JobInfo, input: Self::Input) -> Result<Self::Output, Failure>;
}

impl Failure {
    /// Why the job failed, whether it runs again or not.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Fail(reason) => reason,
            Failure::Retry(retry) => &retry.reason,
        }
    }

    /// The reason of a permanent failure; panics on a transient one. For
    /// unit tests of input checks, which must never ask for a retry.
    pub fn expect_permanent(self) -> String {
        match self {
            Failure::Fail(reason) => reason,
            Failure::Retry(retry) => panic!("expected a permanent failure, got a retry: {}", retry.reason),
        }
    }
}

/// A permanent failure: the job ends now and is not retried.
pub fn fail(reason: impl Into<String>) -> Failure {
    Failure::Fail(reason.into())
}

/// A transient failure: the job runs again after quern's backoff.
pub fn retry(reason: impl Into<String>) -> Failure {
    Failure::Retry(Retry { reason: reason.into(), delay_ms: None })
}

/// A transient failure that must not run again sooner than `delay_ms`.
pub fn retry_after(reason: impl Into<String>, delay_ms: u64) -> Failure {
    Failure::Retry(Retry { reason: reason.into(), delay_ms: Some(delay_ms) })
}

/// Parses a job's JSON input, turning any problem into a permanent failure
/// that names the field and what it expected, and never quotes the value.
pub fn parse_input<T: DeserializeOwned>(input: &str) -> Result<T, Failure> {
    let mut reader = serde_json::Deserializer::from_str(input);
    let parsed: T = serde_path_to_error::deserialize(&mut reader).map_err(|error| {
        let path = error.path().to_string();
        let what = without_values(error.inner());
        let at = if path == "." || path.is_empty() { String::new() } else { format!("field `{path}`: ") };
        fail(format!("invalid input: {at}{what}"))
    })?;
    reader.end().map_err(|error| fail(format!("invalid input: {}", without_values(&error))))?;
    Ok(parsed)
}

/// serde's message with the offending value taken out: `invalid type:
/// string "João", expected u32` becomes `expected u32, got a string`, and an
/// unknown variant is not repeated. Field names and positions stay.
fn without_values(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let position =
        if error.line() > 0 { format!(" at line {} column {}", error.line(), error.column()) } else { String::new() };
    let message = text.strip_suffix(&position).unwrap_or(&text);
    let kind = |unexpected: &str| {
        let kind = unexpected.split(['`', '"']).next().unwrap_or("").trim().to_string();
        match kind.as_str() {
            "" => "a value".to_string(),
            k if k.starts_with(['a', 'e', 'i', 'o', 'u']) => format!("an {k}"),
            k => format!("a {k}"),
        }
    };
    let plain = if let Some(rest) =
        message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))
    {
        match rest.split_once(", expected ") {
            Some((unexpected, expected)) => format!("expected {expected}, got {}", kind(unexpected)),
            None => "a value of the wrong type".to_string(),
        }
    } else if let Some(rest) = message.strip_prefix("unknown variant ") {
        match rest.split_once(", expected ") {
            Some((_, expected)) => format!("not one of the values allowed: expected {expected}"),
            None => "not one of the values allowed".to_string(),
        }
    } else {
        message.to_string()
    };
    format!("{plain}{position}")
}

/// Runs `H` on one job: parse, handle, encode. This is what
/// [`export_handler!`] exports; it calls no host function itself.
pub fn run<H: Handler>(job: Job) -> Result<String, Failure> {
    let input: H::Input = parse_input(&job.input)?;
    let info = JobInfo {
        id: job.id,
        job_type: job.job_type,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        deadline_unix_ms: job.deadline_unix_ms,
    };
    let output = H::handle(&info, input)?;
    serde_json::to_string(&output).map_err(|error| fail(format!("could not encode the result: {error}")))
}

/// Reports progress to whoever follows the job (`percent` is clamped to 100).
pub fn progress(percent: u8, message: &str) {
    bindings::quern::handler::host::progress(percent.min(100), message);
}

/// Reads a configuration value granted to this handler in its manifest.
pub fn config(key: &str) -> Option<String> {
    bindings::quern::handler::host::config(key)
}

/// Reads a granted configuration value that the handler cannot work without;
/// its absence is a deployment mistake, so the job fails permanently.
pub fn required_config(key: &str) -> Result<String, Failure> {
    config(key).ok_or_else(|| fail(format!("configuration key {key} is not set or not granted to this handler")))
}

#[doc(hidden)]
pub fn log_at(level: Level, message: &str) {
    log::write(level, message);
}

#[doc(hidden)]
pub fn install_logger(own_crate: &'static str) {
    log::install(own_crate);
}

/// Exports a [`Handler`] as the component's `handle` function.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        const _: () = {
            struct QuernExport;
            impl $crate::bindings::Guest for QuernExport {
                fn handle(job: $crate::Job) -> ::core::result::Result<::std::string::String, $crate::Failure> {
                    $crate::install_logger(::core::env!("CARGO_CRATE_NAME"));
                    $crate::run::<$handler>(job)
                }
            }
    $crate::bindings::export_world!(QuernExport with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Input {
        #[allow(dead_code)]
        count: u32,
    }

    #[test]
    fn invalid_input_fails_permanently_naming_the_field() {
        let error = parse_input::<Input>(r#"{"count": "three"}"#).unwrap_err().expect_permanent();
        assert!(error.starts_with("invalid input: field `count`: expected u32, got a string"), "{error}");
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Profile {
        patient: Patient,
        meal: Meal,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Patient {
        age: u8,
        name: String,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    enum Meal {
        Lunch,
        Dinner,
    }

    #[test]
    fn invalid_input_never_quotes_the_value() {
        let cases = [
            (
                r#"{"patient": {"age": 300, "name": "x"}, "meal": "lunch"}"#,
                "field `patient.age`: expected u8, got an integer",
                "300",
            ),
            (
                r#"{"patient": {"age": 3, "name": ["Maria da Silva"]}, "meal": "lunch"}"#,
                "field `patient.name`: expected a string, got a sequence",
                "Maria",
            ),
            (
                r#"{"patient": {"age": 3, "name": "x"}, "meal": "almoço secreto"}"#,
                "field `meal`: not one of the values allowed: expected `lunch` or `dinner`",
                "secreto",
            ),
            (
                r#"{"patient": {"age": "trinta e dois", "name": "x"}, "meal": "lunch"}"#,
                "expected u8, got a string",
                "trinta",
            ),
        ];
        for (input, expected, secret) in cases {
            let error = parse_input::<Profile>(input).unwrap_err().expect_permanent();
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains(secret), "the value leaked: {error}");
        }
    }

    #[test]
    fn missing_field_is_named() {
        let error = parse_input::<Input>("{}").unwrap_err().expect_permanent();
        assert!(error.contains("missing field `count`"), "{error}");
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let error = parse_input::<Input>("{\"count\": 1,").unwrap_err().expect_permanent();
        assert!(error.contains("line 1 column"), "{error}");
    }
}

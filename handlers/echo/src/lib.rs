//! `echo`: returns its input with the job's metadata. The smallest useful
//! handler, used to check a deployment and to measure the runtime.

use quern_sdk::serde_json::{Map, Value, json};
use quern_sdk::{Failure, Handler, JobInfo};

pub struct Echo;

impl Handler for Echo {
    /// Any JSON object; anything else is refused as invalid input.
    type Input = Map<String, Value>;
    type Output = Value;

    fn handle(job: &JobInfo, input: Self::Input) -> Result<Value, Failure> {
        quern_sdk::progress(100, "echoed");
        Ok(echo(job, input))
    }
}

/// The result: the input under `echo`, the job's metadata under `job`.
pub fn echo(job: &JobInfo, input: Map<String, Value>) -> Value {
    json!({
        "echo": input,
        "job": {
            "id": job.id,
            "type": job.job_type,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
        },
    })
}

quern_sdk::export_handler!(Echo);

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobInfo {
        JobInfo { id: "j-1".into(), job_type: "echo".into(), attempt: 2, max_attempts: 3, deadline_unix_ms: 0 }
    }

    #[test]
    fn result_carries_the_input_and_the_job() {
        let input = json!({"a": 1, "nested": {"b": [1, 2]}});
        let Value::Object(map) = input.clone() else { unreachable!() };
        let out = echo(&job(), map);
        assert_eq!(out["echo"], input);
        assert_eq!(out["job"]["id"], "j-1");
        assert_eq!(out["job"]["attempt"], 2);
    }

    #[test]
    fn non_object_input_is_refused_by_the_sdk() {
        let job = quern_sdk::Job {
            id: "j".into(),
            job_type: "echo".into(),
            input: "[1,2]".into(),
            attempt: 1,
            max_attempts: 1,
            deadline_unix_ms: 0,
        };
        match quern_sdk::run::<Echo>(job) {
            Err(Failure::Fail(reason)) => assert!(reason.starts_with("invalid input: "), "{reason}"),
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }
}

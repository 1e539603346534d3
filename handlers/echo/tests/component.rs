//! The built `echo` component, run in isolation by `quern_testing`.
//! Build it first: `cargo xtask build-handlers`.

use quern_testing::Harness;
use quern_testing::Outcome;
use serde_json::json;

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR")).build().expect("build the handlers first: cargo xtask build-handlers")
}

#[tokio::test]
async fn echoes_its_input_with_the_job_metadata() {
    let run = harness().run(json!({"a": 1, "list": [true, null]})).await;
    let output = run.output();
    assert_eq!(output["echo"], json!({"a": 1, "list": [true, null]}));
    assert_eq!(output["job"]["type"], "echo");
    assert_eq!(output["job"]["attempt"], 1);
    assert!(run.requests.is_empty(), "echo makes no HTTP requests");
    assert_eq!(run.progress.len(), 1);
    assert_eq!((run.progress[0].percent, run.progress[0].message.as_str()), (100, "echoed"));
}

#[tokio::test]
async fn input_that_is_not_an_object_fails_permanently() {
    let run = harness().run(json!(["not", "an", "object"])).await;
    match run.outcome {
        Outcome::Failed { reason } => {
            assert!(reason.starts_with("invalid input: expected a map, got a sequence"), "{reason}")
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

//! The built `sofia_text` component in isolation, against canned upstream
//! answers in the OpenAI chat-completions wire format.

use quern_testing::Outcome;
use quern_testing::{CannedResponse, Harness, HttpErrorKind};
use serde_json::json;

use quern_testing::upstreams::{GEMINI_KEY, OLLAMA_CHAT as OLLAMA};
const GEMINI: &str = "http://gemini.test/v1beta/openai/chat/completions";

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_ollama()
        .allow_host("gemini.test")
        .config("GEMINI_API_KEY", GEMINI_KEY)
        .config("GEMINI_BASE_URL", "http://gemini.test/v1beta/openai")
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn foods() -> String {
    json!({"foods": [
        {"name": "arroz branco", "portion_g": 150, "kcal": 192.0, "protein_g": 3.8, "carbs_g": 42.2, "fat_g": 0.3, "confidence": 0.9},
        {"name": "feijão carioca", "portion_g": 100, "kcal": 76.0, "protein_g": 4.8, "carbs_g": 13.6, "fat_g": 0.5, "confidence": 0.85}
    ], "totals": {"kcal": 9999}})
    .to_string()
}

fn failure(outcome: &Outcome) -> (&str, Option<u64>, bool) {
    match outcome {
        Outcome::Failed { reason } => (reason, None, false),
        Outcome::Retry { reason, delay } => (reason, delay.map(|d| d.as_millis() as u64), true),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_described_meal_becomes_foods_with_totals_computed_here() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &foods()));
    let run = harness.run(json!({"text": "arroz e feijão", "userId": "ignored"})).await;
    let output = run.output();
    assert_eq!(output["foods"][0]["name"], "arroz branco");
    assert_eq!(
        output["totals"],
        json!({"portion_g": 250.0, "kcal": 268.0, "protein_g": 8.6, "carbs_g": 55.8, "fat_g": 0.8})
    );
    assert_eq!((output["provider"].clone(), output["model"].clone()), (json!("ollama"), json!("llama3.2")));
    assert_eq!(run.requests.len(), 1);
    let sent = run.requests[0].json().unwrap();
    assert_eq!(sent["response_format"], json!({"type": "json_object"}));
    assert_eq!(sent["messages"][1]["content"], "Meal: arroz e feijão");
    assert_eq!(run.requests[0].header("authorization"), None, "Ollama gets no key");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in [
        (json!({}), "missing field `text`"),
        (json!({"text": " "}), "`text` is empty"),
        (json!({"text": 5}), "field `text`: expected a string, got an integer"),
    ] {
        let run = harness.run(input).await;
        let (reason, _, retry) = failure(&run.outcome);
        assert!(!retry && reason.contains(needle), "{reason}");
        assert!(run.requests.is_empty(), "nothing is sent for bad input");
    }
}

#[tokio::test]
async fn ollama_down_falls_through_to_gemini_and_says_who_answered() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::error(HttpErrorKind::Connect, "connection refused"));
    harness.respond("POST", GEMINI, CannedResponse::chat_completion("gemini-2.5-flash", &foods()));
    let run = harness.run(json!({"text": "arroz e feijão"})).await;
    let output = run.output();
    assert_eq!((output["provider"].clone(), output["model"].clone()), (json!("gemini"), json!("gemini-2.5-flash")));
    assert_eq!(run.requests.len(), 2);
    assert_eq!(run.requests[1].header("authorization"), Some(format!("Bearer {GEMINI_KEY}").as_str()));
}

#[tokio::test]
async fn every_provider_failing_is_a_retry() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(500, "model crashed"));
    harness.respond("POST", GEMINI, CannedResponse::text(503, "overloaded"));
    let run = harness.run(json!({"text": "pão"})).await;
    let (reason, delay, retry) = failure(&run.outcome);
    assert!(retry && delay.is_none() && reason.contains("503"), "{reason}");
}

#[tokio::test]
async fn a_rate_limit_from_the_last_provider_carries_its_delay() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::error(HttpErrorKind::Timeout, "no answer in 30 s"));
    harness.respond("POST", GEMINI, CannedResponse::text(429, "quota").with_header("Retry-After", "2"));
    let run = harness.run(json!({"text": "pão"})).await;
    let (reason, delay, retry) = failure(&run.outcome);
    assert!(retry && reason.contains("429"), "{reason}");
    assert_eq!(delay, Some(2000));
}

#[tokio::test]
async fn malformed_output_is_repaired_once_then_fails_quoting_it() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "Claro! Aqui está: arroz"));
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &foods()));
    let run = harness.run(json!({"text": "arroz"})).await;
    assert_eq!(run.output()["foods"].as_array().unwrap().len(), 2, "the second answer was used");
    let retry_prompt = run.requests[1].json().unwrap()["messages"].as_array().unwrap().last().cloned().unwrap();
    assert!(retry_prompt["content"].as_str().unwrap().contains("not the JSON asked for"), "{retry_prompt}");

    let harness = self::harness();
    harness.respond(
        "POST",
        OLLAMA,
        CannedResponse::chat_completion("llama3.2", "{\"foods\": [{\"name\": \"arroz\", \"kcal\": -1}]}"),
    );
    let run = harness.run(json!({"text": "arroz"})).await;
    let (reason, _, retry) = failure(&run.outcome);
    assert!(!retry && reason.contains("it starts: {\"foods\""), "{reason}");
    assert_eq!(run.requests.len(), 2, "asked once more, then gave up");
}

//! The built `dr_vital` component against canned chat completions.

use quern_testing::{CannedResponse, Harness};
use serde_json::json;

use quern_testing::upstreams::OLLAMA_CHAT as OLLAMA;

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_ollama()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

#[tokio::test]
async fn the_app_s_question_is_answered_with_its_health_context_and_a_disclaimer() {
    let harness = harness();
    harness.respond(
        "POST",
        OLLAMA,
        CannedResponse::chat_completion("llama3.2", "Sua glicose de 110 mg/dL está um pouco acima; reduza açúcares."),
    );
    let run = harness
        .run(json!({
            "message": "Minha glicose está boa?",
            "userId": "3f1c2a9e",
            "history": [{"role": "user", "content": "oi", "timestamp": "2026-01-17T10:00:00Z"}],
            "healthContext": {"measurements": {"weight_kg": 82, "glucose_mg_dl": 110}, "goals": ["perder peso"]}
        }))
        .await;
    let output = run.output();
    assert!(output["response"].as_str().unwrap().contains("110 mg/dL"), "{output}");
    assert_eq!(output["emergency"], false);
    assert!(output["disclaimer"].as_str().unwrap().contains("não substitui"), "{output}");
    assert_eq!(output["context_used"], json!(["goals", "measurements"]));
    assert_eq!((output["provider"].clone(), output["model"].clone()), (json!("ollama"), json!("llama3.2")));
    let system = run.requests[0].json().unwrap()["messages"][0]["content"].as_str().unwrap().to_string();
    assert!(system.contains("\"glucose_mg_dl\":110"), "the context reaches the model: {system}");
}

#[tokio::test]
async fn an_emergency_is_told_to_seek_care_without_asking_a_model() {
    let run = harness().run(json!({"message": "Estou com dor no peito e falta de ar"})).await;
    let output = run.output();
    assert_eq!(output["emergency"], true);
    assert!(output["response"].as_str().unwrap().contains("192"), "{output}");
    assert!(run.requests.is_empty(), "no model was asked");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in
        [(json!({"history": []}), "missing field `message`"), (json!({"message": " "}), "`message` is empty")]
    {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert!(!run.failure().contains("diabético"), "never quoted: {}", run.failure());
    }
}

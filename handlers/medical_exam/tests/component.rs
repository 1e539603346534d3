//! The built `medical_exam` component against canned chat completions.

use quern_testing::{CannedResponse, Harness, HttpErrorKind};
use serde_json::json;

use quern_testing::upstreams::{GEMINI_CHAT as GEMINI, OLLAMA_CHAT as OLLAMA};

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_ollama()
        .with_gemini()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn exam() -> String {
    json!({"exam_type": "Glicemia de jejum", "summary": "Glicose acima da referência.",
           "values": [{"name": "Glicose", "value": 126, "unit": "mg/dL", "reference_range": "70-99", "flag": "normal"},
                      {"name": "HbA1c", "value": "6,1%", "unit": null, "reference_range": null, "flag": "high"}]})
    .to_string()
}

#[tokio::test]
async fn an_exam_text_becomes_flagged_values_with_a_disclaimer() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &exam()));
    let run =
        harness.run(json!({"text": "GLICOSE EM JEJUM ..... 126 mg/dL (VR: 70 a 99)", "examType": "glicemia"})).await;
    let output = run.output();
    assert_eq!(output["exam_type"], "Glicemia de jejum");
    assert_eq!(output["values"][0]["flag"], "high", "computed from 126 against 70-99, not the model's `normal`");
    assert_eq!(output["values"][1]["value"], "6,1%");
    assert_eq!(output["values"][1]["flag"], "high", "no readable range: the model's flag stands");
    assert!(output["disclaimer"].as_str().unwrap().contains("não substitui"));
    assert_eq!(output["provider"], "ollama");
    // The seed's `analysis`: one text, the out-of-range values flagged in code.
    let analysis = output["analysis"].as_str().unwrap();
    assert!(analysis.starts_with("Glicose acima da referência."), "{analysis}");
    assert!(analysis.contains("- Glicose: 126 mg/dL (alto, referência 70-99)"), "{analysis}");
    assert!(
        analysis.contains("- HbA1c: 6,1% (alto)") && analysis.ends_with("professional's assessment."),
        "{analysis}"
    );
    let prompt = run.requests[0].json().unwrap()["messages"][1]["content"].as_str().unwrap().to_string();
    assert!(prompt.contains("glicemia") && prompt.contains("126 mg/dL"), "{prompt}");
}

#[tokio::test]
async fn the_app_s_input_with_its_extra_fields_gets_the_seed_s_analysis() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &exam()));
    let run = harness
        .run(json!({"imageUrl": "https://media.example/exame.jpg", "userId": "u-1", "examType": "sangue",
                    "timestamp": "2026-01-17T10:00:00Z"}))
        .await;
    let output = run.output();
    assert!(output["analysis"].is_string() && output["summary"].is_string(), "{output}");
    assert!(output["values"].is_array() && output["exam_type"].is_string(), "{output}");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_fields() {
    let harness = harness();
    for (input, needle) in [
        (json!({}), "exactly one of `imageUrl`, `imageBase64` or `text`"),
        (json!({"text": "x", "imageUrl": "https://m/e.jpg"}), "exactly one of"),
        (json!({"imageUrl": "/etc/exam.jpg"}), "`imageUrl` must be an http"),
        (json!({"text": ""}), "`text` is empty"),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert!(run.requests.is_empty());
    }
}

#[tokio::test]
async fn upstream_failures_fall_through_retry_or_fail() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::error(HttpErrorKind::Connect, "refused"));
    harness.respond("POST", GEMINI, CannedResponse::chat_completion("gemini-2.5-flash", &exam()));
    let run = harness.run(json!({"imageUrl": "https://media.example/exame.jpg"})).await;
    assert_eq!(run.output()["provider"], "gemini");
    assert_eq!(
        run.requests[1].json().unwrap()["messages"][1]["content"][1]["image_url"]["url"],
        "https://media.example/exame.jpg"
    );

    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(500, "oom"));
    harness.respond("POST", GEMINI, CannedResponse::text(429, "quota").with_header("Retry-After", "3"));
    let run = harness.run(json!({"text": "Glicose 90"})).await;
    assert_eq!(run.retry().1, Some(std::time::Duration::from_secs(3)));

    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "{\"values\": []}"));
    let run = harness.run(json!({"text": "Glicose 90"})).await;
    assert!(
        run.failure().contains("missing field `exam_type`") && run.failure().contains("it starts: {\"values\""),
        "{}",
        run.failure()
    );
}

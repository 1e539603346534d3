//! The built `unified_assistant` component against canned chat completions.

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

#[tokio::test]
async fn a_message_gets_a_reply_naming_who_answered() {
    let harness = harness();
    harness.respond(
        "POST",
        OLLAMA,
        CannedResponse::chat_completion("llama3.2", "  Prefira um jantar leve, com legumes.  "),
    );
    let run =
        harness.run(json!({"message": "O que comer no jantar?", "history": [], "context": {"goal": "maintain"}})).await;
    assert_eq!(
        run.output(),
        json!({"response": "Prefira um jantar leve, com legumes.", "provider": "ollama", "model": "llama3.2"})
    );
}

#[tokio::test]
async fn the_app_s_input_with_its_extra_fields_gets_the_seed_s_response() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "Beba água ao longo do dia."));
    let run = harness
        .run(json!({
            "message": "Quanta água devo beber?",
            "userId": "3f1c2a9e-0000-4000-8000-00000000a11c",
            "history": [{"role": "user", "content": "oi", "timestamp": "2026-01-17T10:00:00Z"},
                        {"role": "assistant", "content": "Olá!", "timestamp": "2026-01-17T10:00:01Z"}],
        }))
        .await;
    let output = run.output();
    assert_eq!(output["response"], "Beba água ao longo do dia.", "{output}");
    assert!(output["provider"].is_string() && output["model"].is_string(), "{output}");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in [
        (json!({"history": []}), "missing field `message`"),
        (json!({"message": ""}), "`message` is empty"),
        (json!({"message": "oi", "history": [{"role": "tool", "content": "x"}]}), "`history[0].role`"),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert!(!run.failure().contains("not an object"), "an input's value is never quoted: {}", run.failure());
    }
}

#[tokio::test]
async fn upstream_failures_fall_through_or_retry() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::error(HttpErrorKind::Connect, "refused"));
    harness.respond("POST", GEMINI, CannedResponse::chat_completion("gemini-2.5-flash", "Olá!"));
    assert_eq!(harness.run(json!({"message": "oi"})).await.output()["provider"], "gemini");

    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(502, "bad gateway"));
    harness.respond("POST", GEMINI, CannedResponse::text(429, "quota").with_header("Retry-After", "2"));
    let run = harness.run(json!({"message": "oi"})).await;
    assert_eq!(run.retry().1, Some(std::time::Duration::from_secs(2)));

    // An empty or unreadable answer is worth another attempt later.
    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "   "));
    assert!(harness.run(json!({"message": "oi"})).await.retry().0.contains("empty reply"));
    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(200, "<html>proxy error</html>"));
    harness.respond("POST", GEMINI, CannedResponse::text(500, "down"));
    assert!(harness.run(json!({"message": "oi"})).await.retry().0.contains("500"));
}

//! The built `whatsapp_ai_assistant` component against canned chat
//! completions and WhatsApp Cloud API answers.

use quern_testing::upstreams::{OLLAMA_CHAT as OLLAMA, WHATSAPP_MESSAGES as API};
use quern_testing::{CannedResponse, Harness};
use serde_json::json;

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_whatsapp()
        .with_ollama()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn sends(run: &quern_testing::HarnessRun) -> usize {
    run.requests.iter().filter(|r| r.url == API).count()
}

#[tokio::test]
async fn the_assistant_s_answer_is_sent_to_the_sender_once() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "Sim! Ovo é uma ótima proteína."));
    harness.respond(
        "POST",
        API,
        CannedResponse::json(200, json!({"messaging_product": "whatsapp", "messages": [{"id": "wamid.AI"}]})),
    );
    let run = harness.run(json!({"from": "5511999998888", "type": "text", "text": {"body": "Posso comer ovo?"}})).await;
    let output = run.output();
    assert_eq!(output["response"], "Sim! Ovo é uma ótima proteína.");
    assert_eq!((output["message_id"].clone(), output["to"].clone()), (json!("wamid.AI"), json!("5511999998888")));
    assert_eq!(sends(&run), 1);
    let sent = run.requests.iter().find(|r| r.url == API).unwrap().json().unwrap();
    assert_eq!(sent["text"]["body"], "Sim! Ovo é uma ótima proteína.");
}

#[tokio::test]
async fn nothing_is_sent_when_the_model_fails_and_bad_input_names_its_field() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(502, "bad gateway"));
    let run = harness.run(json!({"to": "+5511999998888", "message": "oi"})).await;
    assert_eq!(sends(&run), 0, "nothing is sent before the answer exists");
    for (input, needle) in [
        (json!({"message": "oi"}), "missing field `from`"),
        (json!({"from": "abc", "message": "oi"}), "`from` is not an E.164 number"),
        (json!({"from": "5511999998888", "message": "  "}), "`message` is empty"),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert_eq!(sends(&run), 0);
    }
}

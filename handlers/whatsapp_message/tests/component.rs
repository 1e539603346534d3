//! The built `whatsapp_message` component against canned WhatsApp Cloud API answers.

use quern_testing::{CannedResponse, Harness, HttpErrorKind};
use serde_json::json;

use quern_testing::upstreams::{OLLAMA_CHAT, WHATSAPP_MESSAGES as API, WHATSAPP_TOKEN};

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_whatsapp()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn accepted() -> CannedResponse {
    CannedResponse::json(
        200,
        json!({"messaging_product": "whatsapp",
        "contacts": [{"input": "5511999998888", "wa_id": "5511999998888"}], "messages": [{"id": "wamid.HBgM"}]}),
    )
}

#[tokio::test]
async fn a_text_message_is_sent_once_in_the_cloud_api_format() {
    let harness = harness();
    harness.respond("POST", API, accepted());
    let run = harness.run(json!({"to": "+5511999998888", "text": "Seu plano da semana está pronto!"})).await;
    assert_eq!(run.output(), json!({"message_id": "wamid.HBgM", "to": "5511999998888", "status": "accepted"}));
    assert_eq!(run.requests.len(), 1);
    assert_eq!(run.requests[0].header("authorization"), Some(format!("Bearer {WHATSAPP_TOKEN}").as_str()));
    let body = run.requests[0].json().unwrap();
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(
        (body["type"].clone(), body["text"]["body"].clone()),
        (json!("text"), json!("Seu plano da semana está pronto!"))
    );
}

#[tokio::test]
async fn after_the_assistant_in_a_pipeline_its_response_is_sent_and_the_app_s_user_id_is_ignored() {
    let harness = harness();
    harness.respond("POST", API, accepted());
    // What the queue gives the step after `unified_assistant`: its result under `previous`.
    let previous = json!({"response": "Beba água ao longo do dia.", "provider": "ollama", "model": "llama3.2"});
    let run = harness.run(json!({"to": "+5511999998888", "userId": "u-1", "previous": previous})).await;
    assert_eq!(run.output()["status"], "accepted");
    assert_eq!(run.requests.len(), 1, "sent once");
    assert_eq!(run.requests[0].json().unwrap()["text"]["body"], "Beba água ao longo do dia.");
}

#[tokio::test]
async fn an_incoming_message_gets_an_ai_reply_sent_once() {
    let harness = Harness::of_crate(env!("CARGO_MANIFEST_DIR")).with_whatsapp().with_ollama().build().unwrap();
    harness.respond(
        "POST",
        OLLAMA_CHAT,
        CannedResponse::chat_completion("llama3.2", "Prefira frutas e iogurte natural."),
    );
    harness.respond("POST", API, accepted());
    let run = harness.run(json!({"to": "+5511999998888", "reply_to": "Qual um bom lanche?", "userId": "u"})).await;
    let output = run.output();
    assert_eq!(output["reply"], "Prefira frutas e iogurte natural.", "{output}");
    assert_eq!((output["status"].clone(), output["provider"].clone()), (json!("accepted"), json!("ollama")));
    let sends: Vec<_> = run.requests.iter().filter(|r| r.url == API).collect();
    assert_eq!(sends.len(), 1, "sent once");
    assert_eq!(sends[0].json().unwrap()["text"]["body"], "Prefira frutas e iogurte natural.");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in [
        (json!({"text": "oi"}), "missing field `to`"),
        (json!({"to": "11987654321", "text": "oi"}), "`to` is not an E.164 number"),
        (json!({"to": "+5511999998888"}), "`text`, `template` or `reply_to` is required"),
        (json!({"to": "+5511999998888", "text": "oi", "template": {"name": "x"}}), "not both"),
        (
            json!({"to": "+5511999998888", "previous": {"provider": "ollama"}}),
            "`previous` (the result of the job before) has no text",
        ),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert!(!run.failure().contains("11987654321"), "a phone number is never quoted: {}", run.failure());
        assert!(run.requests.is_empty(), "nothing is sent for bad input");
    }
}

#[tokio::test]
async fn the_api_s_refusals_and_outages_are_told_apart() {
    let harness = harness();
    harness.respond("POST", API, CannedResponse::json(400, json!({"error": {"message": "(#131030) Recipient phone number not in allowed list", "type": "OAuthException", "code": 131030}})));
    let run = harness.run(json!({"to": "+5511999998888", "text": "oi"})).await;
    assert!(run.failure().contains("(#131030) Recipient phone number not in allowed list"), "{}", run.failure());

    let harness = self::harness();
    harness.respond("POST", API, CannedResponse::text(429, "").with_header("Retry-After", "30"));
    let run = harness.run(json!({"to": "+5511999998888", "text": "oi"})).await;
    assert_eq!(run.retry().1, Some(std::time::Duration::from_secs(30)));

    let harness = self::harness();
    harness.respond("POST", API, CannedResponse::error(HttpErrorKind::Connect, "connection refused"));
    assert!(harness.run(json!({"to": "+5511999998888", "text": "oi"})).await.retry().0.contains("nothing was sent"));

    for ambiguous in
        [CannedResponse::error(HttpErrorKind::Timeout, "no answer in 15 s"), CannedResponse::text(500, "internal")]
    {
        let harness = self::harness();
        harness.respond("POST", API, ambiguous);
        let run = harness.run(json!({"to": "+5511999998888", "text": "oi"})).await;
        assert!(run.failure().starts_with("delivery unknown"), "{}", run.failure());
        assert_eq!(run.requests.len(), 1);
    }
}

#[tokio::test]
async fn an_acceptance_without_a_message_id_fails_without_resending() {
    let harness = harness();
    harness.respond("POST", API, CannedResponse::text(200, "<html>captive portal</html>"));
    let run = harness.run(json!({"to": "+5511999998888", "text": "oi"})).await;
    assert!(run.failure().contains("has no message id: <html>captive portal"), "{}", run.failure());
    assert_eq!(run.requests.len(), 1, "an answer that may mean delivery is never followed by a second send");
}

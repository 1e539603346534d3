//! The built `whatsapp_nutrition_webhook` component against canned chat
//! completions and WhatsApp Cloud API answers.

use quern_testing::{CannedResponse, Harness, HttpErrorKind};
use serde_json::json;

use quern_testing::upstreams::{OLLAMA_CHAT as OLLAMA, WHATSAPP_MESSAGES as API};

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_whatsapp()
        .with_ollama()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn foods() -> String {
    json!({"foods": [
        {"name": "arroz", "portion_g": 150, "kcal": 192, "protein_g": 3.8, "carbs_g": 42.2, "fat_g": 0.3, "confidence": 0.9},
        {"name": "feijão", "portion_g": 100, "kcal": 76, "protein_g": 4.8, "carbs_g": 13.6, "fat_g": 0.5, "confidence": 0.85}
    ]})
    .to_string()
}

fn accepted() -> CannedResponse {
    CannedResponse::json(200, json!({"messaging_product": "whatsapp", "messages": [{"id": "wamid.NUT"}]}))
}

fn sends(run: &quern_testing::HarnessRun) -> usize {
    run.requests.iter().filter(|r| r.url == API).count()
}

#[tokio::test]
async fn a_meal_in_words_is_analysed_and_the_reply_sent_once() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &foods()));
    harness.respond("POST", API, accepted());
    // As Meta delivers it: `from` without `+`, the text as `{body}`.
    let run = harness.run(json!({"from": "5511999998888", "type": "text", "text": {"body": "arroz e feijão"}})).await;
    let output = run.output();
    assert_eq!(output["totals"]["kcal"], 268.0, "summed in code: 192 + 76");
    assert_eq!(output["totals"]["protein_g"], 8.6);
    assert_eq!((output["message_id"].clone(), output["to"].clone()), (json!("wamid.NUT"), json!("5511999998888")));
    assert_eq!(sends(&run), 1);
    let sent = run.requests.iter().find(|r| r.url == API).unwrap().json().unwrap();
    let body = sent["text"]["body"].as_str().unwrap();
    assert!(body.contains("Total: 268,0 kcal") && body == output["reply"].as_str().unwrap(), "{body}");
}

#[tokio::test]
async fn an_ambiguous_failure_sends_exactly_one_message_and_a_model_failure_sends_none() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &foods()));
    harness.respond("POST", API, CannedResponse::error(HttpErrorKind::Timeout, "no answer in 15 s"));
    let run = harness.run(json!({"from": "+5511999998888", "text": "arroz e feijão"})).await;
    assert!(run.failure().starts_with("delivery unknown"), "{}", run.failure());
    assert_eq!(sends(&run), 1, "exactly one request at the API");

    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(502, "bad gateway"));
    let run = harness.run(json!({"from": "+5511999998888", "imageUrl": "https://media.example/prato.jpg"})).await;
    assert_eq!(sends(&run), 0, "nothing is sent before the analysis succeeds");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in [
        (json!({"text": "arroz"}), "missing field `from`"),
        (json!({"from": "11987654321x", "text": "arroz"}), "`from` is not an E.164 number"),
        (json!({"from": "+5511999998888"}), "`text` or `imageUrl` is required"),
        (json!({"from": "+5511999998888", "imageUrl": "ftp://x"}), "`imageUrl` must be an http or https URL"),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert!(!run.failure().contains("11987654321"), "never quoted: {}", run.failure());
        assert_eq!(sends(&run), 0);
    }
}

/// Meta's webhook carries a photo as a media id (its URL needs the token, so
/// the model could not fetch it): fetched here, handed to the model as data,
/// the caption beside it.
#[tokio::test]
async fn a_photo_sent_to_the_number_is_fetched_by_its_media_id_and_analysed_with_its_caption() {
    let harness = harness();
    harness.respond(
        "GET",
        "http://graph.test/v21.0/1093847561",
        CannedResponse::json(
            200,
            json!({"url": "http://graph.test/media/1093847561", "mime_type": "image/png",
                                         "id": "1093847561", "messaging_product": "whatsapp"}),
        ),
    );
    harness.respond("GET", "http://graph.test/media/1093847561", CannedResponse::text(200, "PNGDATA"));
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llava", &foods()));
    harness.respond("POST", API, accepted());
    let message = json!({"from": "5511999998888", "id": "wamid.IMG", "timestamp": "1760000000", "type": "image",
                         "image": {"id": "1093847561", "mime_type": "image/png", "caption": "meu almoço"}});
    let run = harness.run(message).await;
    assert_eq!(run.output()["totals"]["kcal"], 268.0);
    let fetches: Vec<_> = run.requests.iter().filter(|r| r.method == "GET").collect();
    assert_eq!(fetches.len(), 2, "the media's URL, then its bytes");
    assert!(fetches.iter().all(|r| r.header("authorization") == Some("Bearer wa-token")), "both with the token");
    let chat = run.requests.iter().find(|r| r.url == OLLAMA).unwrap().json().unwrap().to_string();
    assert!(chat.contains("data:image/png;base64,UE5HREFUQQ=="), "the photo as data: {chat}");
    assert!(chat.contains("The user wrote: meu almoço"), "the caption kept: {chat}");
}

//! The built `sofia_image` component in isolation: YOLO's `/detect` and the
//! vision model answered by canned responses in their wire formats.

use quern_testing::Outcome;
use quern_testing::{CannedResponse, Harness, HttpErrorKind};
use serde_json::json;

const YOLO: &str = "http://yolo.test/detect";
use quern_testing::upstreams::{GEMINI_CHAT as GEMINI, OLLAMA_CHAT as OLLAMA};

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .allow_host("yolo.test")
        .config("YOLO_URL", "http://yolo.test")
        .with_ollama()
        .with_gemini()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn foods() -> String {
    json!({"foods": [{"name": "banana", "portion_g": 120, "kcal": 107.0, "protein_g": 1.6, "carbs_g": 27.6, "fat_g": 0.1, "confidence": 0.95}]})
        .to_string()
}

fn detections() -> CannedResponse {
    CannedResponse::json(
        200,
        json!({"detections": [{"class": "banana", "confidence": 0.93, "bbox": [12, 40, 220, 180]}]}),
    )
}

#[tokio::test]
async fn a_photo_is_analysed_with_yolo_s_detections_as_context() {
    let harness = harness();
    harness.respond("POST", YOLO, detections());
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llava", &foods()));
    // The app's input: Portuguese meal type, its userId.
    let run =
        harness.run(json!({"imageUrl": "https://media.example/banana.jpg", "mealType": "lanche", "userId": "x"})).await;
    let output = run.output();
    // The seed's fields with the seed's types.
    let foods: serde_json::Value = serde_json::from_str(output["foods"].as_str().unwrap()).unwrap();
    assert_eq!(foods["foods"][0]["name"], "banana", "`foods` is the model's text");
    assert_eq!(
        output["yolo_detections"],
        json!({"detections": [{"class": "banana", "confidence": 0.93, "bbox": [12, 40, 220, 180]}]}),
        "`yolo_detections` is YOLO's body as received"
    );
    let timestamp = output["timestamp"].as_str().unwrap();
    assert!(timestamp.len() >= 20 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T', "{timestamp}");
    // The structured analysis.
    assert_eq!(output["items"][0]["name"], "banana");
    assert_eq!(output["totals"]["kcal"], 107.0);
    assert_eq!(output["detections"][0]["label"], "banana");
    assert_eq!(output["meal_type"], "snack");
    assert_eq!(output["yolo"], json!({"available": true, "error": null}));
    assert_eq!((output["provider"].clone(), output["model"].clone()), (json!("ollama"), json!("llava")));
    assert_eq!(run.requests[0].json().unwrap(), json!({"image_url": "https://media.example/banana.jpg"}));
    let chat = run.requests[1].json().unwrap();
    assert_eq!(chat["model"], "llava", "the vision model");
    let parts = &chat["messages"][1]["content"];
    assert!(parts[0]["text"].as_str().unwrap().contains("banana (0.93)"), "{parts}");
    assert_eq!(parts[1], json!({"type": "image_url", "image_url": {"url": "https://media.example/banana.jpg"}}));
}

#[tokio::test]
async fn yolo_down_the_analysis_goes_on_without_detections_and_says_so() {
    let harness = harness();
    harness.respond("POST", YOLO, CannedResponse::error(HttpErrorKind::Connect, "connection refused"));
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llava", &foods()));
    let run = harness.run(json!({"imageBase64": "iVBORw0KGgoAAAANSUhEUg"})).await;
    let output = run.output();
    assert_eq!((output["yolo_detections"].clone(), output["detections"].clone()), (json!(null), json!([])));
    assert_eq!(output["yolo"]["available"], false);
    assert!(output["yolo"]["error"].as_str().unwrap().contains("YOLO is unavailable"), "{output}");
    assert_eq!(output["items"][0]["name"], "banana");
    let chat = run.requests[1].json().unwrap();
    assert!(chat["messages"][1]["content"][0]["text"].as_str().unwrap().contains("No object detector results"));
    assert_eq!(chat["messages"][1]["content"][1]["image_url"]["url"], "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg");

    let harness = self::harness();
    harness.respond("POST", YOLO, CannedResponse::text(500, "CUDA out of memory"));
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llava", &foods()));
    let output = harness.run(json!({"imageUrl": "https://media.example/b.jpg"})).await.output();
    assert!(output["yolo"]["error"].as_str().unwrap().contains("500"), "{output}");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in [
        (json!({"mealType": "lunch"}), "`imageUrl` or `imageBase64` is required"),
        (json!({"imageUrl": "ftp://x/y.jpg"}), "`imageUrl` must be an http or https URL"),
        (json!({"imageUrl": "https://x/y.jpg", "mealType": "x".repeat(41)}), "`mealType`"),
    ] {
        let run = harness.run(input).await;
        match &run.outcome {
            Outcome::Failed { reason } => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected a permanent failure, got {other:?}"),
        }
        assert!(run.requests.is_empty());
    }
}

#[tokio::test]
async fn model_failures_fall_through_retry_or_fail_for_the_right_reasons() {
    // Ollama answers 500, Gemini answers: the job completes on Gemini.
    let harness = harness();
    harness.respond("POST", YOLO, detections());
    harness.respond("POST", OLLAMA, CannedResponse::text(500, "boom"));
    harness.respond("POST", GEMINI, CannedResponse::chat_completion("gemini-2.5-flash", &foods()));
    assert_eq!(harness.run(json!({"imageUrl": "https://m/b.jpg"})).await.output()["provider"], "gemini");

    // Both rate limited: retried no sooner than Gemini's Retry-After.
    let harness = self::harness();
    harness.respond("POST", YOLO, detections());
    harness.respond("POST", OLLAMA, CannedResponse::text(429, "busy"));
    harness.respond("POST", GEMINI, CannedResponse::text(429, "quota").with_header("Retry-After", "7"));
    match harness.run(json!({"imageUrl": "https://m/b.jpg"})).await.outcome {
        Outcome::Retry { delay, .. } => assert_eq!(delay, Some(std::time::Duration::from_secs(7))),
        other => panic!("expected a retry, got {other:?}"),
    }

    // Every provider down: the job is retried later.
    let harness = self::harness();
    harness.respond("POST", YOLO, detections());
    harness.respond("POST", OLLAMA, CannedResponse::error(HttpErrorKind::Connect, "refused"));
    harness.respond("POST", GEMINI, CannedResponse::error(HttpErrorKind::Timeout, "no answer"));
    assert!(harness.run(json!({"imageUrl": "https://m/b.jpg"})).await.retry().0.contains("timed out"));

    // Prose twice: seed 000's processSofiaImage kept the model's words
    // (`foods: geminiResponse.data.choices[0].message.content`) and YOLO's
    // body (`yolo_detections: yoloResponse.data`); so does quern, with no
    // items to sum rather than a failed job.
    let harness = self::harness();
    harness.respond("POST", YOLO, detections());
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llava", "I see a banana!"));
    let output = harness.run(json!({"imageUrl": "https://m/b.jpg"})).await.output();
    assert_eq!(output["foods"], "I see a banana!");
    assert_eq!((output["items"].clone(), output["totals"]["kcal"].clone()), (json!([]), json!(0.0)));
    assert_eq!(output["yolo_detections"]["detections"][0]["class"], "banana", "YOLO's body as received");
}

//! The customer's ten job types end to end: `quern serve` running the built
//! handler components, with YOLO, Ollama, Gemini and the WhatsApp Cloud API
//! played by loopback fakes that speak their wire formats.

mod support;

use std::time::Duration;

use quern_fakes::{Fake, Kind, Mode, closed_url};
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Options, Server};

const TYPES: [&str; 10] = [
    "sofia_image",
    "sofia_text",
    "medical_exam",
    "unified_assistant",
    "meal_plan",
    "whatsapp_message",
    "dr_vital",
    "whatsapp_nutrition_webhook",
    "google_fit_analysis",
    "whatsapp_ai_assistant",
];
const GEMINI_KEY: &str = "gemini-secret-key-e2e";
const WHATSAPP_TOKEN: &str = "whatsapp-secret-token-e2e";

struct Upstreams {
    yolo: Fake,
    ollama: Fake,
    gemini: Fake,
    whatsapp: Fake,
}

impl Upstreams {
    async fn start() -> Self {
        Self {
            yolo: Fake::start(Kind::Yolo).await,
            ollama: Fake::start(Kind::Chat).await,
            gemini: Fake::start(Kind::Chat).await,
            whatsapp: Fake::start(Kind::Whatsapp).await,
        }
    }
}

/// The shipped manifest, allowed to reach the loopback fakes too.
fn manifest(job_type: &str) -> String {
    let shipped = std::fs::read_to_string(support::dist(&format!("{job_type}.toml"))).unwrap();
    shipped.replace("allowed_hosts = [", "allowed_hosts = [\"127.0.0.1\", ")
}

/// The variables the handlers read, offered from the plain environment.
const OFFERED: &str = "YOLO_URL,OLLAMA_URL,GEMINI_API_KEY,GEMINI_BASE_URL,GEMINI_MODEL,WHATSAPP_API_URL,WHATSAPP_TOKEN,\
                       WHATSAPP_PHONE_NUMBER_ID,WHATSAPP_TIMEOUT_MS";

/// `quern serve` with the six handlers and the fakes, with `overrides` of
/// its environment (say, an upstream's URL where nothing listens).
async fn serve(db: &Db, up: &Upstreams, overrides: &[(&'static str, String)]) -> Server {
    let mut env = vec![
        ("YOLO_URL", up.yolo.url()),
        ("OLLAMA_URL", up.ollama.url()),
        ("GEMINI_API_KEY", GEMINI_KEY.into()),
        ("GEMINI_BASE_URL", format!("{}/v1beta/openai", up.gemini.url())),
        ("WHATSAPP_API_URL", format!("{}/v21.0", up.whatsapp.url())),
        ("WHATSAPP_TOKEN", WHATSAPP_TOKEN.into()),
        ("WHATSAPP_PHONE_NUMBER_ID", "1234567890".into()),
        ("WHATSAPP_TIMEOUT_MS", "1000".into()),
        ("WORKER_RETRY_DELAY_MS", "100".into()),
        // As the customer's container offers them (see the Dockerfile).
        ("QUERN_HANDLER_ENV", OFFERED.into()),
    ];
    env.retain(|(key, _)| !overrides.iter().any(|(k, _)| k == key));
    env.extend(overrides.iter().cloned());
    let options = Options { handlers: TYPES.iter().map(|t| (*t, manifest(t))).collect(), env, ..Options::default() };
    let server = Server::start_with(db, options).await;
    server.remember(GEMINI_KEY.into());
    server.remember(WHATSAPP_TOKEN.into());
    server
}

async fn run_to_end(server: &Server, token: &str, job_type: &str, input: Value) -> Value {
    let answer = server.enqueue(token, job_type, input).await;
    assert_eq!(answer.status, 202, "{job_type}: {}", answer.text);
    let id = answer.body["id"].as_str().unwrap().to_string();
    server
        .poll_job(token, &id, Duration::from_secs(30), |job| {
            job["status"] == "completed" || job["status"] == "failed" || job["status"] == "cancelled"
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_ten_job_types_run_end_to_end_through_quern_serve() {
    let db = Db::sqlite().await;
    let up = Upstreams::start().await;
    let server = serve(&db, &up, &[]).await;
    let token = server.token("9b2f3c1e-user");
    let cases = [
        ("sofia_image", json!({"imageUrl": "https://media.example/prato.jpg", "mealType": "lunch"})),
        ("sofia_text", json!({"text": "arroz, feijão e bife acebolado"})),
        ("medical_exam", json!({"text": "GLICOSE ..... 110 mg/dL (VR 70 a 99)"})),
        (
            "unified_assistant",
            json!({"message": "O que comer no jantar?", "history": [{"role": "user", "content": "oi"}]}),
        ),
        (
            "meal_plan",
            json!({"profile": {"age": 30, "sex": "female", "weight_kg": 70, "height_cm": 165,
                                         "activity": "moderate", "goal": "lose_weight"}, "days": 2}),
        ),
        ("whatsapp_message", json!({"to": "+5511999998888", "text": "Seu plano está pronto!"})),
        ("dr_vital", json!({"message": "Como está minha pressão?", "healthContext": {"measurements": {"bp": "12/8"}}})),
        ("whatsapp_nutrition_webhook", json!({"from": "5511999998888", "text": {"body": "arroz e feijão"}})),
        (
            "google_fit_analysis",
            json!({"steps": [{"date": "2026-01-01", "steps": 7000}, {"date": "2026-01-02", "steps": "9000"}]}),
        ),
        ("whatsapp_ai_assistant", json!({"from": "5511977776666", "text": {"body": "O que comer no jantar?"}})),
    ];
    // Messages go out from the app's backend only (`[access]` of its manifest).
    let service = server.service_token();
    for (job_type, input) in cases {
        let token = if job_type.starts_with("whatsapp") { &service } else { &token };
        let job = run_to_end(&server, token, job_type, input).await;
        assert_eq!(job["status"], "completed", "{job_type}: {job}");
        let result = &job["result"];
        match job_type {
            "sofia_image" => {
                assert_eq!(result["yolo_detections"]["detections"][0]["class"], "rice", "YOLO's body as received");
                assert!(result["foods"].is_string() && result["timestamp"].is_string(), "{result}");
                assert_eq!(result["totals"]["kcal"], 268.0);
            }
            "sofia_text" => assert_eq!(result["foods"][1]["name"], "feijão"),
            "medical_exam" => assert_eq!(result["values"][0]["flag"], "high"),
            "unified_assistant" => assert!(result["response"].as_str().unwrap().starts_with("Olá")),
            "meal_plan" => {
                assert_eq!(result["days"].as_array().unwrap().len(), 2);
                assert_eq!(result["days"][0]["kcal_total"], result["targets"]["kcal"]);
            }
            "whatsapp_message" => assert_eq!(result["message_id"], "wamid.fake"),
            "dr_vital" => {
                assert!(result["response"].is_string() && result["disclaimer"].is_string(), "{result}");
                assert_eq!(result["context_used"], json!(["measurements"]));
            }
            "whatsapp_nutrition_webhook" => {
                assert_eq!(result["totals"]["kcal"], 268.0, "192 + 76, summed in code");
                assert!(result["reply"].as_str().unwrap().contains("268,0 kcal"), "{result}");
            }
            "google_fit_analysis" => {
                assert_eq!(result["stats"]["steps"]["total"], 16000.0);
                assert!(result["narrative"].is_string(), "{result}");
            }
            "whatsapp_ai_assistant" => {
                assert!(result["response"].as_str().unwrap().starts_with("Olá"), "{result}");
                assert_eq!(result["to"], "5511977776666");
            }
            _ => unreachable!(),
        }
        if job_type != "whatsapp_message" {
            assert_eq!(result["provider"], "ollama", "{job_type}");
        }
    }
    let sent = up.whatsapp.seen();
    assert_eq!(sent.len(), 3, "the message, the webhook's reply and the assistant's answer, once each");
    assert_eq!(sent[0].path, "/v21.0/1234567890/messages");
    assert_eq!(sent[0].authorization.as_deref(), Some(&*format!("Bearer {WHATSAPP_TOKEN}")));
    let vision = up.ollama.seen().into_iter().find(|s| s.body["model"] == "llava").expect("a vision request");
    assert_eq!(vision.body["messages"][1]["content"][1]["image_url"]["url"], "https://media.example/prato.jpg");
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_down_the_job_completes_through_gemini() {
    let db = Db::sqlite().await;
    let up = Upstreams::start().await;
    let server = serve(&db, &up, &[("OLLAMA_URL", closed_url())]).await;
    let token = server.token("alice");
    let job = run_to_end(&server, &token, "sofia_text", json!({"text": "pão com ovo"})).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(
        (job["result"]["provider"].clone(), job["result"]["model"].clone()),
        (json!("gemini"), json!("gemini-2.5-flash"))
    );
    assert_eq!(up.gemini.seen()[0].authorization.as_deref(), Some(&*format!("Bearer {GEMINI_KEY}")));
    server.finish().await;
    db.cleanup().await;
}

/// The hook's sync fallback is served by quern for the types whose manifest
/// names the legacy function, with the seed's fields; and a pipeline
/// `unified_assistant → whatsapp_message` sends the assistant's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_functions_answer_with_the_seed_s_fields_and_the_assistant_s_answer_goes_to_whatsapp() {
    let db = Db::sqlite().await;
    let up = Upstreams::start().await;
    let server = serve(&db, &up, &[]).await;
    let token = server.token("9b2f3c1e-user");
    let call = |name: &'static str, body: Value| {
        let request = server
            .client
            .post(format!("{}/functions/v1/{name}", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_string());
        async move { support::server::read(request.send().await.unwrap()).await }
    };
    let assistant = call("unified-ai-assistant", json!({"message": "O que comer no jantar?", "userId": "x"})).await;
    assert_eq!(assistant.status, 200, "{}", assistant.text);
    assert!(assistant.body["response"].is_string(), "{}", assistant.text);
    let image =
        call("sofia-image-analysis", json!({"imageUrl": "https://media.example/prato.jpg", "mealType": "almoco"}))
            .await;
    assert_eq!(image.status, 200, "{}", image.text);
    assert!(image.body["foods"].is_string() && image.body["timestamp"].is_string(), "{}", image.text);
    assert_eq!(image.body["yolo_detections"]["detections"][0]["class"], "rice", "{}", image.text);
    let exam = call("analyze-medical-exam", json!({"text": "GLICOSE ..... 110 mg/dL (VR 70 a 99)"})).await;
    assert!(exam.body["analysis"].is_string(), "{}", exam.text);

    let service = server.service_token();
    let body = json!({"type": "unified_assistant", "input": {"message": "Dica do dia?"},
                      "next": [{"type": "whatsapp_message", "input": {"to": "+5511999998888", "userId": "x"}}]});
    let first = server.post("/v1/jobs", &service, body).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let sent = up.whatsapp.clone();
    support::poll_until(Duration::from_secs(30), "the assistant's answer at WhatsApp", || {
        (!sent.seen().is_empty()).then_some(())
    })
    .await;
    let seen = up.whatsapp.seen();
    assert_eq!(seen.len(), 1, "sent once");
    assert!(seen[0].body["text"]["body"].as_str().unwrap().starts_with("Olá"), "{:?}", seen[0].body);

    // Seed 001's P1 function `whatsapp-ai-assistant` (~800 calls a day),
    // called by the app's backend: answered and sent by quern.
    let request = server
        .client
        .post(format!("{}/functions/v1/whatsapp-ai-assistant", server.base))
        .bearer_auth(&service)
        .header("content-type", "application/json")
        .body(json!({"phone": "+5511955554444", "message": "Quantas calorias tem uma banana?"}).to_string());
    let reply = support::server::read(request.send().await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.body["response"].as_str().unwrap().starts_with("Olá"), "{}", reply.text);
    assert_eq!(reply.body["to"], "5511955554444", "{}", reply.text);
    assert_eq!(up.whatsapp.seen().len(), 2, "and sent once");
    server.finish().await;
    db.cleanup().await;
}

/// The seed's Gemini gateway and model by two settings alone: the shipped
/// manifests allow `{{ GEMINI_BASE_URL }}`, so wherever it points is reachable
/// (here a loopback stand-in) with no manifest edit, and `/v1/handlers` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gemini_gateway_is_chosen_by_settings_without_editing_a_manifest() {
    let db = Db::sqlite().await;
    let gemini = Fake::start(Kind::Chat).await;
    let shipped = |t: &'static str| (t, std::fs::read_to_string(support::dist(&format!("{t}.toml"))).unwrap());
    let gateway = format!("{}/v1", gemini.url());
    // Ollama stays at the seed's internal name, which does not resolve here: down.
    let env = vec![
        ("GEMINI_API_KEY", GEMINI_KEY.into()),
        ("GEMINI_BASE_URL", gateway.clone()),
        ("GEMINI_MODEL", "google/gemini-2.5-pro".into()),
        ("QUERN_HANDLER_ENV", OFFERED.into()),
    ];
    let options = Options { handlers: vec![shipped("sofia_text")], env, ..Options::default() };
    let server = Server::start_with(&db, options).await;
    server.remember(GEMINI_KEY.into());
    let job = run_to_end(&server, &server.token("alice"), "sofia_text", json!({"text": "pão com ovo"})).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(
        (job["result"]["provider"].clone(), job["result"]["model"].clone()),
        (json!("gemini"), json!("google/gemini-2.5-pro"))
    );
    assert_eq!(gemini.seen().len(), 1, "the gateway answered");

    let handlers = server.get("/v1/handlers", &server.service_token()).await;
    let sofia = handlers.body.as_array().unwrap().iter().find(|t| t["type"] == "sofia_text").unwrap();
    let host = gemini.url().trim_start_matches("http://").to_string();
    assert!(sofia["allowed_hosts"].as_array().unwrap().iter().any(|h| h == &json!(host)), "{sofia}");
    server.finish().await;
    db.cleanup().await;
}

/// Gemini, the last provider, answers 429 with `Retry-After: 2`. The host's
/// HTTP client honours it for its own three tries; when all three are
/// refused the handler hands the delay to the queue, which runs the job
/// again no sooner than 2 s later, and it completes. No request ever follows
/// a 429 sooner than its `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_rate_limit_delays_the_retry_by_its_retry_after() {
    let db = Db::postgres().await;
    let up = Upstreams::start().await;
    up.gemini.then(vec![Mode::RateLimited(2); 3]);
    let server = serve(&db, &up, &[("OLLAMA_URL", closed_url())]).await;
    let token = server.token("alice");
    let job = run_to_end(&server, &token, "sofia_text", json!({"text": "tapioca com queijo"})).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["history"][0]["outcome"], "retry");
    assert!(job["history"][0]["error"].as_str().unwrap().contains("429"), "{job}");
    let seen = up.gemini.seen();
    assert_eq!(seen.len(), 4, "three refused tries in attempt 1, one in attempt 2: no hot loop");
    for pair in seen.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_secs(2), "a request came {gap:?} after a 429 with Retry-After: 2");
    }
    server.finish().await;
    db.cleanup().await;
}

/// YOLO down: `sofia_image` completes without detections and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yolo_down_sofia_image_completes_without_detections() {
    let db = Db::sqlite().await;
    let up = Upstreams::start().await;
    let server = serve(&db, &up, &[("YOLO_URL", closed_url())]).await;
    let token = server.token("alice");
    let job = run_to_end(&server, &token, "sofia_image", json!({"imageUrl": "https://media.example/p.jpg"})).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["yolo_detections"], json!(null));
    assert_eq!(job["result"]["detections"], json!([]));
    assert_eq!(job["result"]["yolo"]["available"], false);
    assert!(job["result"]["yolo"]["error"].as_str().unwrap().contains("YOLO is unavailable"), "{job}");
    assert_eq!(job["result"]["items"][0]["name"], "arroz");
    server.finish().await;
    db.cleanup().await;
}

/// A WhatsApp request that may have been delivered is never sent again:
/// a timeout after sending or a 500 fails the job with exactly one request
/// at the API; a refused connection (nothing sent) is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_never_sends_twice_for_one_job() {
    let db = Db::postgres().await;
    let up = Upstreams::start().await;
    let server = serve(&db, &up, &[]).await;
    let token = server.service_token();
    let senders = [
        ("whatsapp_message", json!({"to": "+5511999998888", "text": "oi"})),
        ("whatsapp_nutrition_webhook", json!({"from": "5511999998888", "text": "arroz e feijão"})),
    ];
    for (job_type, input) in senders {
        for mode in [Mode::Slow(Duration::from_secs(3)), Mode::ServerError] {
            up.whatsapp.set(mode.clone());
            let before = up.whatsapp.seen().len();
            let job = run_to_end(&server, &token, job_type, input.clone()).await;
            assert_eq!(job["status"], "failed", "{job_type} {mode:?}: {job}");
            assert!(job["error"].as_str().unwrap().starts_with("delivery unknown"), "{job}");
            assert_eq!(up.whatsapp.seen().len() - before, 1, "{job_type} {mode:?}: exactly one request for the job");
            assert_eq!(job["attempts"], 1, "not retried");
        }
    }
    // Rate limited first (the API refused, nothing delivered): sent again
    // after its Retry-After, and delivered once.
    up.whatsapp.set(Mode::Healthy);
    up.whatsapp.then(vec![Mode::RateLimited(1)]);
    let before = up.whatsapp.seen().len();
    let job = run_to_end(&server, &token, "whatsapp_message", json!({"to": "+5511999998888", "text": "de novo"})).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(up.whatsapp.seen().len() - before, 2, "the refused request and the delivered one");
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_model_output_fails_the_job_quoting_it() {
    let db = Db::sqlite().await;
    let up = Upstreams::start().await;
    up.ollama.set(Mode::Malformed);
    let server = serve(&db, &up, &[]).await;
    let token = server.token("alice");
    let job = run_to_end(&server, &token, "medical_exam", json!({"text": "Hemoglobina 13,5 g/dL (12 a 16)"})).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("it starts: Sorry, I cannot help"), "{job}");
    assert_eq!(job["attempts"], 1, "a permanent failure is not retried");
    assert_eq!(up.ollama.seen().len(), 2, "asked once, then once more with the error");
    server.finish().await;
    db.cleanup().await;
}

//! Loopback servers that speak the wire formats of the customer's upstreams
//! (used by quern's tests, `quern bench e2e` and `cargo run -p quern
//! --example fake_upstreams`):
//! YOLO's `POST /detect`, an OpenAI-compatible `POST …/chat/completions`
//! (Ollama's `/v1`, Gemini's OpenAI endpoint; vision content parts
//! included), and the WhatsApp Cloud API's `POST /{phone-id}/messages`. Each
//! can be switched to answer slowly, fail with 500, rate-limit with
//! `Retry-After`, or (the chat API) send malformed model output; "down" is a
//! URL where nothing listens ([`closed_url`]). Every request is recorded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How the fake answers its next requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Healthy,
    /// Answers as `Healthy`, after this long.
    Slow(Duration),
    ServerError,
    /// 429 with `Retry-After: <seconds>`.
    RateLimited(u64),
    /// A 200 whose model output is not the JSON asked for.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Yolo,
    Chat,
    Whatsapp,
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
    pub at: Instant,
}

struct Inner {
    kind: Kind,
    /// Modes for the next requests, in order; `fallback` after them.
    script: VecDeque<Mode>,
    fallback: Mode,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl Fake {
    /// On a free loopback port. Panics if none can be bound (a test fixture).
    pub async fn start(kind: Kind) -> Self {
        Self::start_on(kind, "127.0.0.1:0").await
    }

    /// On a given address (`cargo run -p quern --example fake_upstreams`);
    /// panics naming the address if it cannot be bound.
    pub async fn start_on(kind: Kind, addr: &str) -> Self {
        let inner =
            Arc::new(Mutex::new(Inner { kind, script: VecDeque::new(), fallback: Mode::Healthy, seen: Vec::new() }));
        let listener =
            tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        let addr = listener.local_addr().expect("a bound listener has an address");
        let app = axum::Router::new().fallback(answer).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer every request this way from now on.
    pub fn set(&self, mode: Mode) {
        let mut inner = lock(&self.inner);
        inner.script.clear();
        inner.fallback = mode;
    }

    /// Answer the next requests in these ways, then as before.
    pub fn then(&self, modes: Vec<Mode>) {
        lock(&self.inner).script.extend(modes);
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.inner).seen.clone()
    }
}

/// A URL where nothing listens: an upstream that is down. (A port the OS
/// just gave out and took back; nothing else here binds it meanwhile.)
pub fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    format!("http://{}", listener.local_addr().expect("a bound listener has an address"))
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn answer(State(inner): State<Arc<Mutex<Inner>>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (kind, mode) = {
        let mut inner = lock(&inner);
        inner.seen.push(Seen {
            path: uri.path().to_string(),
            authorization: headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string),
            body: body.clone(),
            at: Instant::now(),
        });
        let mode = inner.script.pop_front().unwrap_or_else(|| inner.fallback.clone());
        (inner.kind, mode)
    };
    match mode {
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::ServerError => return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
        Mode::RateLimited(seconds) => {
            let body = axum::Json(json!({"error": {"message": "rate limited", "code": 429}}));
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", seconds.to_string())], body).into_response();
        }
        Mode::Healthy | Mode::Malformed => {}
    }
    let malformed = mode == Mode::Malformed;
    match kind {
        Kind::Yolo => axum::Json(json!({"detections": [
            {"class": "rice", "confidence": 0.91, "bbox": [10, 20, 200, 180]},
            {"class": "beans", "confidence": 0.87, "bbox": [150, 30, 300, 200]}
        ]}))
        .into_response(),
        Kind::Chat => {
            let content = if malformed { "Sorry, I cannot help with that.".to_string() } else { chat_reply(&body) };
            let model = body["model"].as_str().unwrap_or("fake-model").to_string();
            axum::Json(json!({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}))
            .into_response()
        }
        Kind::Whatsapp => axum::Json(json!({"messaging_product": "whatsapp",
            "contacts": [{"input": body["to"], "wa_id": body["to"]}], "messages": [{"id": "wamid.fake"}]}))
        .into_response(),
    }
}

/// What a model would answer each handler, told apart by its instructions.
fn chat_reply(body: &Value) -> String {
    let system = body["messages"][0]["content"].as_str().unwrap_or_default();
    let user = match &body["messages"][1]["content"] {
        Value::String(text) => text.clone(),
        parts => parts[0]["text"].as_str().unwrap_or_default().to_string(),
    };
    if system.contains("nutritionist") {
        json!({"foods": [
            {"name": "arroz", "portion_g": 150, "kcal": 192, "protein_g": 3.8, "carbs_g": 42.2, "fat_g": 0.3, "confidence": 0.9},
            {"name": "feijão", "portion_g": 100, "kcal": 76, "protein_g": 4.8, "carbs_g": 13.6, "fat_g": 0.5, "confidence": 0.85}
        ]})
        .to_string()
    } else if system.contains("laboratory exams") {
        json!({"exam_type": "Glicemia", "summary": "Glicose acima da referência.",
               "values": [{"name": "Glicose", "value": 110, "unit": "mg/dL", "reference_range": "70-99", "flag": "normal"}]})
        .to_string()
    } else if system.contains("dietitian") {
        // "Plan N day(s) … about K kcal": meals that add up to K each day.
        let number_after = |marker: &str| -> f64 {
            user.split(marker)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1.0)
        };
        let days = number_after("Plan ") as u32;
        let kcal = number_after("about ");
        let food = |name: &str, share: f64| json!({"name": name, "portion_g": 100, "kcal": kcal * share, "protein_g": 20, "carbs_g": 50, "fat_g": 10});
        let days: Vec<Value> = (1..=days)
            .map(|day| {
                json!({"day": day, "meals": [
                    {"name": "café da manhã", "foods": [food("pão integral", 0.25)]},
                    {"name": "almoço", "foods": [food("arroz", 0.2), food("feijão", 0.15)]},
                    {"name": "lanche", "foods": [food("fruta", 0.1)]},
                    {"name": "jantar", "foods": [food("sopa", 0.3)]}
                ]})
            })
            .collect();
        json!({"days": days}).to_string()
    } else {
        "Olá! Prefira um jantar leve, com legumes e uma proteína magra.".to_string()
    }
}

//! `quern-ai`: AI chat for quern handlers, through a chain of providers that
//! speak the OpenAI chat-completions wire format: Ollama (`OLLAMA_URL`, its `/v1/chat/completions`), then Gemini
//! (`GEMINI_API_KEY`, at `GEMINI_BASE_URL`, by default Google's
//! OpenAI-compatible endpoint), then any OpenAI-compatible endpoint
//! (`OPENAI_BASE_URL`, `OPENAI_API_KEY`). Each is used only when the handler's
//! manifest grants its keys.
//!
//! A provider that cannot be reached, times out, answers 5xx or 429 hands the
//! request to the next one. When the last one answers 429 the job is retried
//! no sooner than its `Retry-After` (the queue backs off; nothing loops here);
//! when it is down or failing the job is retried with the queue's backoff. A
//! 4xx other than 429 is a permanent failure: asking again will not help.
//!
//! [`chat_json`] asks for JSON, parses it into the caller's type, asks once
//! more with the parse error if it does not fit, and then fails quoting the
//! start of what the model said.
//!
//! One file over 400 lines on purpose: the provider chain, its failover rules
//! and its wire format are one policy; the last fifth is its unit tests.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use quern_sdk::http::{Request, Response, failure_from_error, post, retry_after_ms, snippet};
use quern_sdk::{Failure, config, fail, retry, retry_after};

/// One provider of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// `ollama`, `gemini` or `openai`: recorded in results.
    pub name: &'static str,
    /// The API root; `/chat/completions` is appended.
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    /// The model for requests with images, when it differs.
    pub vision_model: Option<String>,
}

impl Provider {
    fn model_for(&self, request: &ChatRequest) -> &str {
        match &self.vision_model {
            Some(vision) if request.has_images() => vision,
            _ => &self.model,
        }
    }
}

/// Reads the chain from configuration: a provider for each one whose keys
/// are granted and set, in the order Ollama, Gemini, OpenAI-compatible.
pub fn providers_from_config() -> Vec<Provider> {
    providers_from(config)
}

/// The chain from any source of configuration (testable without the host).
pub fn providers_from(get: impl Fn(&str) -> Option<String>) -> Vec<Provider> {
    let get = |key: &str| get(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let mut chain = Vec::new();
    if let Some(url) = get("OLLAMA_URL") {
        chain.push(Provider {
            name: "ollama",
            base_url: format!("{}/v1", url.trim_end_matches('/')),
            api_key: None,
            model: get("OLLAMA_MODEL").unwrap_or_else(|| "llama3.2".into()),
            vision_model: Some(get("OLLAMA_VISION_MODEL").unwrap_or_else(|| "llava".into())),
        });
    }
    if let Some(key) = get("GEMINI_API_KEY") {
        chain.push(Provider {
            name: "gemini",
            base_url: get("GEMINI_BASE_URL")
                .unwrap_or_else(|| "https://generativelanguage.googleapis.com/v1beta/openai".into())
                .trim_end_matches('/')
                .to_string(),
            api_key: Some(key),
            model: get("GEMINI_MODEL").unwrap_or_else(|| "gemini-2.5-flash".into()),
            vision_model: None,
        });
    }
    if let Some(url) = get("OPENAI_BASE_URL") {
        chain.push(Provider {
            name: "openai",
            base_url: url.trim_end_matches('/').to_string(),
            api_key: get("OPENAI_API_KEY"),
            model: get("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o-mini".into()),
            vision_model: None,
        });
    }
    chain
}

/// A part of a message: text, or an image by URL (`https://…` or a
/// `data:image/…;base64,…` URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

impl Part {
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text { text: text.into() }
    }

    pub fn image(url: impl Into<String>) -> Self {
        Self::ImageUrl { image_url: ImageUrl { url: url.into() } }
    }

    /// An image given as base64 bytes; `mime` like `image/jpeg`.
    pub fn image_base64(mime: &str, base64: &str) -> Self {
        Self::image(format!("data:{mime};base64,{base64}"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Part>,
}

impl Message {
    pub fn system(text: impl Into<String>) -> Self {
        Self { role: "system".into(), content: vec![Part::text(text)] }
    }

    pub fn user(text: impl Into<String>) -> Self {
        Self { role: "user".into(), content: vec![Part::text(text)] }
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Self { role: "assistant".into(), content: vec![Part::text(text)] }
    }

    pub fn user_parts(content: Vec<Part>) -> Self {
        Self { role: "user".into(), content }
    }

    /// The message as the wire wants it: plain text as a string, anything
    /// with an image as content parts.
    fn to_wire(&self) -> Value {
        match self.content.as_slice() {
            [Part::Text { text }] => json!({"role": self.role, "content": text}),
            parts => json!({"role": self.role, "content": parts}),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// Ask for a JSON object (`response_format: {"type": "json_object"}`).
    pub json: bool,
    pub temperature: Option<f32>,
    /// Per provider request; the host's default when absent.
    pub timeout_ms: Option<u32>,
}

impl ChatRequest {
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages, ..Self::default() }
    }

    fn has_images(&self) -> bool {
        self.messages.iter().flat_map(|m| &m.content).any(|p| matches!(p, Part::ImageUrl { .. }))
    }

    /// The chat-completions body for `model`.
    pub fn body(&self, model: &str) -> Value {
        let mut body = json!({
            "model": model,
            "messages": self.messages.iter().map(Message::to_wire).collect::<Vec<_>>(),
            "stream": false,
        });
        if self.json {
            body["response_format"] = json!({"type": "json_object"});
        }
        if let Some(temperature) = self.temperature {
            body["temperature"] = json!(temperature);
        }
        body
    }
}

/// What the chain answered, and who answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatReply {
    pub content: String,
    pub provider: &'static str,
    pub model: String,
}

/// How one provider's attempt ended, when it did not answer.
#[derive(Debug)]
pub enum ProviderError {
    /// Down, timed out, 5xx or 429: the next provider may do; if none is
    /// left, this is the job's failure (a retry).
    Unavailable(Failure),
    /// A refusal that another try will not change (4xx, a malformed answer).
    Refused(Failure),
}

/// Sends `request` through `chain`, falling through as described above.
pub fn chat_with(chain: &[Provider], request: &ChatRequest) -> Result<ChatReply, Failure> {
    let mut last = None;
    for provider in chain {
        match ask(provider, request) {
            Ok(reply) => return Ok(reply),
            Err(ProviderError::Refused(failure)) => return Err(failure),
            Err(ProviderError::Unavailable(failure)) => {
                quern_sdk::warn!("AI provider {} unavailable, trying the next: {}", provider.name, failure.reason());
                last = Some(failure);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        fail("no AI provider is configured: grant and set OLLAMA_URL, GEMINI_API_KEY or OPENAI_BASE_URL")
    }))
}

/// The longest message a conversation takes from the user.
pub const MAX_MESSAGE_CHARS: usize = 4000;
/// The most turns of a conversation replayed to a model.
pub const MAX_HISTORY: usize = 40;

/// One turn of a conversation the app kept; other fields (a turn's
/// `timestamp`) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Turn {
    pub role: String,
    #[serde(alias = "text", alias = "message")]
    pub content: String,
}

/// A turn's role as apps spell it: `user` (also `human`, `usuario`), or
/// `assistant` (also `bot`, `sofia`, `model`, `ai`, `assistente`), any case.
pub fn turn_role(role: &str) -> Option<&'static str> {
    match role.trim().to_lowercase().as_str() {
        "user" | "human" | "usuario" | "usuário" => Some("user"),
        "assistant" | "bot" | "sofia" | "model" | "ai" | "assistente" => Some("assistant"),
        _ => None,
    }
}

/// Fields that say nothing to a model about the user: ids.
pub const IDS: [&str; 4] = ["userId", "user_id", "id", "jobId"];

/// What the app sent about the user, as facts for the model: an object as
/// it is; words (or any other value) as `{"notes": …}`; nothing for null.
/// Then every field of `rest` not read elsewhere, ids left out: nothing the
/// caller sent is dropped.
pub fn facts(context: Option<&Value>, rest: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    let mut facts = match context {
        Some(Value::Object(object)) => object.clone(),
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(other) => serde_json::Map::from_iter([("notes".to_string(), other.clone())]),
    };
    for (key, value) in rest {
        if !IDS.contains(&key.as_str()) && !value.is_null() {
            facts.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    facts
}

/// Facts about the user given to the model with the instructions: what
/// they are (`label`, e.g. "The user's health data") and the JSON object.
pub type Context<'a> = (&'a str, &'a serde_json::Map<String, Value>);

/// A chat's messages: the `system` instructions (with the `context`, if
/// any), the conversation so far, then the user's `message`; a permanent
/// failure naming the field (never quoting it) when the message is empty
/// or too long, there are too many turns, or a turn's role is not `user` or
/// `assistant`.
pub fn conversation(
    system: &str,
    context: Option<Context<'_>>,
    history: &[Turn],
    message: &str,
) -> Result<Vec<Message>, Failure> {
    let message = message.trim();
    if message.is_empty() {
        return Err(fail("invalid input: `message` is empty"));
    }
    if message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(fail(format!("invalid input: `message` is longer than {MAX_MESSAGE_CHARS} characters")));
    }
    if history.len() > MAX_HISTORY {
        return Err(fail(format!(
            "invalid input: `history` has {} turns; send at most the last {MAX_HISTORY}",
            history.len()
        )));
    }
    let system = match context {
        Some((label, facts)) => format!("{system}\n\n{label} (JSON): {}", Value::Object(facts.clone())),
        None => system.to_string(),
    };
    let mut messages = vec![Message::system(system)];
    for (i, turn) in history.iter().enumerate() {
        messages.push(match turn_role(&turn.role) {
            Some("user") => Message::user(turn.content.clone()),
            Some(_) => Message::assistant(turn.content.clone()),
            None => return Err(fail(format!("invalid input: `history[{i}].role` must be `user` or `assistant`"))),
        });
    }
    messages.push(Message::user(message));
    Ok(messages)
}

/// [`chat_with`] the chain from configuration.
pub fn chat(request: &ChatRequest) -> Result<ChatReply, Failure> {
    chat_with(&providers_from_config(), request)
}

/// One provider, one request.
pub fn ask(provider: &Provider, request: &ChatRequest) -> Result<ChatReply, ProviderError> {
    let model = provider.model_for(request).to_string();
    let mut builder = post(format!("{}/chat/completions", provider.base_url))
        .json(&request.body(&model))
        .map_err(ProviderError::Refused)?;
    if let Some(key) = &provider.api_key {
        builder = builder.bearer(key);
    }
    if let Some(timeout) = request.timeout_ms {
        builder = builder.timeout_ms(timeout);
    }
    let sent = builder.build();
    let response = quern_sdk::http::send(&sent).map_err(|error| match failure_from_error(&sent, &error) {
        retryable @ Failure::Retry(_) => ProviderError::Unavailable(retryable),
        permanent => ProviderError::Refused(permanent),
    })?;
    parse_reply(provider, &sent, &response, model)
}

/// Reads a chat-completions response.
pub fn parse_reply(
    provider: &Provider,
    request: &Request,
    response: &Response,
    model: String,
) -> Result<ChatReply, ProviderError> {
    let status = response.status;
    let said = || format!("{} ({}) answered {status}: {}", provider.name, request.url, snippet(&response.body));
    if status == 429 {
        let wait = retry_after_ms(response);
        let reason = format!("{}; rate limited", said());
        return Err(ProviderError::Unavailable(match wait {
            Some(ms) => retry_after(reason, ms),
            None => retry(reason),
        }));
    }
    if status >= 500 {
        return Err(ProviderError::Unavailable(retry(said())));
    }
    if !(200..300).contains(&status) {
        return Err(ProviderError::Refused(fail(said())));
    }
    #[derive(Deserialize)]
    struct Completion {
        model: Option<String>,
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: ChoiceMessage,
    }
    #[derive(Deserialize)]
    struct ChoiceMessage {
        content: Option<String>,
    }
    let completion: Completion = serde_json::from_slice(&response.body).map_err(|error| {
        ProviderError::Unavailable(retry(format!(
            "{} answered with a body that is not a chat completion ({error}): {}",
            provider.name,
            snippet(&response.body)
        )))
    })?;
    let content = completion.choices.into_iter().next().and_then(|c| c.message.content).ok_or_else(|| {
        ProviderError::Unavailable(retry(format!("{} answered with no message content", provider.name)))
    })?;
    Ok(ChatReply { content, provider: provider.name, model: completion.model.unwrap_or(model) })
}

/// Asks for JSON and parses it into `T`, then checks it with `check` (the
/// rules serde cannot say: ranges, required content). If either fails, asks
/// once more with the error; then fails quoting the start of the output.
pub fn chat_json_with<T: DeserializeOwned>(
    chain: &[Provider],
    request: &ChatRequest,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<(T, ChatReply), Failure> {
    match chat_json_or_text_with(chain, request, check)? {
        (Ok(value), reply) => Ok((value, reply)),
        (Err(error), reply) => Err(fail(format!(
            "the model's output is not the expected JSON, twice ({error}); it starts: {}",
            snippet(reply.content.as_bytes())
        ))),
    }
}

/// [`chat_json_with`] for a handler whose result keeps the model's words
/// anyway (seed 000's `foods: choices[0].message.content`): when the answer
/// is still not the JSON asked for after the one repair, the reply comes
/// back with what is wrong with it, rather than a failed job.
#[allow(clippy::type_complexity)] // (the value or why not, the reply): read at once by the caller
pub fn chat_json_or_text_with<T: DeserializeOwned>(
    chain: &[Provider],
    request: &ChatRequest,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<(Result<T, String>, ChatReply), Failure> {
    let read = |content: &str| parse_json::<T>(content).map_err(|e| e.to_string()).and_then(|v| check(&v).map(|()| v));
    let mut request = ChatRequest { json: true, ..request.clone() };
    let reply = chat_with(chain, &request)?;
    let error = match read(&reply.content) {
        Ok(value) => return Ok((Ok(value), reply)),
        Err(error) => error,
    };
    request.messages.push(Message::assistant(reply.content.clone()));
    request.messages.push(Message::user(format!(
        "That reply is not the JSON asked for: {error}. Answer again with only the corrected JSON object."
    )));
    let repaired = chat_with(chain, &request)?;
    match read(&repaired.content) {
        Ok(value) => Ok((Ok(value), repaired)),
        Err(error) => Ok((Err(error), repaired)),
    }
}

/// [`chat_json_or_text_with`] the chain from configuration.
#[allow(clippy::type_complexity)] // as chat_json_or_text_with
pub fn chat_json_or_text<T: DeserializeOwned>(
    request: &ChatRequest,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<(Result<T, String>, ChatReply), Failure> {
    chat_json_or_text_with(&providers_from_config(), request, check)
}

/// [`chat_json_with`] the chain from configuration.
pub fn chat_json<T: DeserializeOwned>(
    request: &ChatRequest,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<(T, ChatReply), Failure> {
    chat_json_with(&providers_from_config(), request, check)
}

/// Parses model output as JSON of `T`, tolerating a Markdown code fence
/// around it (models add one even when asked not to).
pub fn parse_json<T: DeserializeOwned>(content: &str) -> Result<T, serde_json::Error> {
    let trimmed = content.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.trim_end().strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(unfenced.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_chain_follows_the_granted_keys_in_order() {
        let chain = providers_from(config(&[
            ("GEMINI_API_KEY", "g-key"),
            ("OLLAMA_URL", "http://ollama:11434/"),
            ("GEMINI_BASE_URL", "http://gemini.test/v1/"),
        ]));
        let names: Vec<_> = chain.iter().map(|p| p.name).collect();
        assert_eq!(names, ["ollama", "gemini"]);
        assert_eq!(chain[0].base_url, "http://ollama:11434/v1");
        assert_eq!(chain[1].base_url, "http://gemini.test/v1");
        assert_eq!(chain[1].api_key.as_deref(), Some("g-key"));
        assert!(providers_from(config(&[("OLLAMA_URL", "  ")])).is_empty(), "blank is unset");
    }

    #[test]
    fn text_stays_a_string_and_images_become_content_parts() {
        let request = ChatRequest {
            json: true,
            ..ChatRequest::new(vec![
                Message::system("be brief"),
                Message::user_parts(vec![Part::text("what is this?"), Part::image_base64("image/png", "iVBOR")]),
            ])
        };
        let body = request.body("llava");
        assert_eq!(body["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            body["messages"][1]["content"][1],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}})
        );
        assert_eq!(body["response_format"], json!({"type": "json_object"}));
        assert!(request.has_images());
    }

    #[test]
    fn vision_requests_use_the_vision_model() {
        let ollama = &providers_from(config(&[("OLLAMA_URL", "http://o"), ("OLLAMA_MODEL", "qwen")]))[0];
        let text = ChatRequest::new(vec![Message::user("hi")]);
        let image = ChatRequest::new(vec![Message::user_parts(vec![Part::image("https://x/y.jpg")])]);
        assert_eq!(ollama.model_for(&text), "qwen");
        assert_eq!(ollama.model_for(&image), "llava");
    }

    #[test]
    fn fenced_json_is_accepted() {
        let parsed: Value = parse_json("```json\n{\"a\": 1}\n```").unwrap();
        assert_eq!(parsed, json!({"a": 1}));
        assert!(parse_json::<Value>("Sure! {\"a\": 1}").is_err());
    }

    fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response::new(status, headers, body)
    }

    #[test]
    fn statuses_decide_between_the_next_provider_and_giving_up() {
        let provider = &providers_from(config(&[("GEMINI_API_KEY", "k")]))[0];
        let request = post("http://gemini.test/chat/completions").build();
        let limited = parse_reply(provider, &request, &reply(429, &[("Retry-After", "2")], "slow"), "m".into());
        match limited {
            Err(ProviderError::Unavailable(Failure::Retry(retry))) => assert_eq!(retry.delay_ms, Some(2000)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reply(provider, &request, &reply(503, &[], ""), "m".into()),
            Err(ProviderError::Unavailable(Failure::Retry(_)))
        ));
        assert!(matches!(
            parse_reply(provider, &request, &reply(400, &[], "bad key"), "m".into()),
            Err(ProviderError::Refused(Failure::Fail(_)))
        ));
        let ok = parse_reply(
            provider,
            &request,
            &reply(
                200,
                &[],
                r#"{"model": "gemini-2.5-flash", "choices": [{"message": {"role": "assistant", "content": "{}"}}]}"#,
            ),
            "m".into(),
        )
        .unwrap();
        assert_eq!((ok.provider, ok.model.as_str(), ok.content.as_str()), ("gemini", "gemini-2.5-flash", "{}"));
    }
}

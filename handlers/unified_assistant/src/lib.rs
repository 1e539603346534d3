//! `unified_assistant`: the app's assistant. A message, the conversation so
//! far and optional context (the user's goals, today's meals) → a reply in
//! the user's language. Plain text out, so no JSON mode here; the reply is
//! checked to be non-empty. The reply is `response`, as the seed's worker
//! returns it. Nothing the app sends is dropped: a `context` of words, and
//! fields not read here, go to the model as context (ids aside); a turn's
//! role may be `bot` (see `quern_ai::turn_role`).

use quern_ai::{ChatRequest, Turn, chat, conversation, facts};
use quern_sdk::serde_json::{Map, Value};
use quern_sdk::{Failure, Handler, JobInfo, retry};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub struct Input {
    #[serde(alias = "text")]
    pub message: String,
    #[serde(default)]
    pub history: Vec<Turn>,
    /// Facts about the user the assistant may use: a JSON object, or words.
    pub context: Option<Value>,
    /// Everything else the app sent goes to the model as context (ids aside).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Serialize)]
pub struct Output {
    /// The assistant's answer (the seed's `response`).
    pub response: String,
    pub provider: String,
    pub model: String,
}

pub const PROMPT: &str = "You are Sofia, the assistant of a nutrition and health app. Answer in the \
user's language, briefly and kindly, with practical advice on food, habits and the app's features. You do \
not diagnose or prescribe: for symptoms, medicines or exams, suggest seeing a health professional.";

pub struct UnifiedAssistant;

impl Handler for UnifiedAssistant {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let request = request(&input)?;
        quern_sdk::progress(10, "thinking");
        let reply = chat(&request)?;
        let text = reply.content.trim();
        if text.is_empty() {
            return Err(retry(format!("{} answered an empty reply", reply.provider)));
        }
        Ok(Output { response: text.to_string(), provider: reply.provider.into(), model: reply.model })
    }
}

/// The chat request, or a permanent failure naming the bad field.
pub fn request(input: &Input) -> Result<ChatRequest, Failure> {
    let facts = facts(input.context.as_ref(), &input.rest);
    let context = (!facts.is_empty()).then_some(("What the app knows about the user", &facts));
    let messages = conversation(PROMPT, context, &input.history, &input.message)?;
    Ok(ChatRequest { temperature: Some(0.6), ..ChatRequest::new(messages) })
}

quern_sdk::export_handler!(UnifiedAssistant);

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> Input {
        quern_sdk::parse_input(json).unwrap_or_else(|_| panic!("{json}"))
    }

    fn reason(result: Result<ChatRequest, Failure>) -> String {
        match result {
            Err(Failure::Fail(reason)) => reason,
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }

    #[test]
    fn the_conversation_is_replayed_in_order_with_the_context() {
        let request = request(&input(
            r#"{"message": "E no jantar?", "history": [{"role": "user", "content": "Posso comer pão?"},
                {"role": "assistant", "content": "Sim, com moderação."}], "context": {"goal": "lose_weight"}}"#,
        ))
        .unwrap();
        let body = request.body("m");
        let roles: Vec<&str> =
            body["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(body["messages"][0]["content"].as_str().unwrap().contains(r#"{"goal":"lose_weight"}"#));
        assert_eq!(body["messages"][3]["content"], "E no jantar?");
        assert!(body.get("response_format").is_none(), "plain text, not JSON mode");
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(reason(request(&input(r#"{"message": " "}"#))).contains("`message` is empty"));
        assert!(
            reason(request(&input(r#"{"message": "oi", "history": [{"role": "system", "content": "x"}]}"#)))
                .contains("`history[0].role`")
        );
    }

    /// Issue 39: a history role `bot`, a string `context`, and fields the
    /// handler does not read all reach the model; ids do not.
    #[test]
    fn nothing_the_app_sends_is_dropped() {
        let request = request(&input(
            r#"{"message": "E agora?", "history": [{"role": "Bot", "content": "Olá!"}], "context": "gestante",
                "objetivo": "perder peso", "userId": "u-1"}"#,
        ))
        .unwrap();
        let body = request.body("m");
        assert_eq!(body["messages"][1]["role"], "assistant");
        let system = body["messages"][0]["content"].as_str().unwrap();
        assert!(system.contains(r#""notes":"gestante""#) && system.contains(r#""objetivo":"perder peso""#), "{system}");
        assert!(!system.contains("u-1"), "{system}");
    }
}

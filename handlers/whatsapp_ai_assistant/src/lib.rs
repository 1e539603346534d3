//! `whatsapp_ai_assistant`: a WhatsApp message to the app's assistant →
//! the assistant's answer (Sofia, as `unified_assistant` answers in the app)
//! → sent back to the sender once. The answer comes first: a failing model
//! is retried before anything is sent, and once the reply may have left it
//! is never sent again (see `quern-whatsapp`).
//!
//! It takes the message as the app's function was called or as Meta's
//! webhook delivers it, and drops nothing the caller sent: fields it does
//! not know go to the model as context.

use quern_ai::{ChatRequest, Turn, chat, conversation, facts};
use quern_sdk::serde_json::{Map, Value};
use quern_sdk::{Failure, Handler, JobInfo, retry};
use quern_whatsapp::{MAX_TEXT_CHARS, send, sender_digits, text_body};
use serde::{Deserialize, Serialize};

/// `{from | to | phone, message | text, history?, context?}`; `text` may be
/// the Cloud API's `{"body": …}`, the number its digits without `+`.
#[derive(Debug, Deserialize)]
pub struct Input {
    #[serde(alias = "to", alias = "phone")]
    pub from: String,
    #[serde(alias = "text")]
    pub message: Text,
    #[serde(default)]
    pub history: Vec<Turn>,
    pub context: Option<Value>,
    /// Everything else the caller sent.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Text {
    Plain(String),
    Cloud { body: String },
}

#[derive(Debug, Serialize)]
pub struct Output {
    /// The assistant's answer, as sent (the seed's `response`).
    pub response: String,
    pub message_id: String,
    pub to: String,
    pub status: &'static str,
    pub provider: String,
    pub model: String,
}

pub const PROMPT: &str = "You are Sofia, the assistant of a nutrition and health app, answering in a \
WhatsApp chat. Answer in the user's language, briefly and kindly (a few short sentences, plain text, no \
tables or headings), with practical advice on food, habits and the app's features. You do not diagnose or \
prescribe: for symptoms, medicines or exams, suggest seeing a health professional.";

/// Fields of Meta's message that say nothing to the model.
const ENVELOPE_FIELDS: [&str; 4] = ["id", "timestamp", "type", "context_id"];

pub struct WhatsappAiAssistant;

impl Handler for WhatsappAiAssistant {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let to = sender_digits(&input.from)?;
        let request = request(&input)?;
        quern_sdk::progress(10, "thinking");
        let reply = chat(&request)?;
        let text: String = reply.content.trim().chars().take(MAX_TEXT_CHARS).collect();
        if text.is_empty() {
            return Err(retry(format!("{} answered an empty reply", reply.provider)));
        }
        quern_sdk::progress(80, "replying");
        let sent = send(&text_body(&to, &text, "response")?)?;
        Ok(Output {
            response: text,
            message_id: sent.message_id,
            to: sent.to,
            status: sent.status,
            provider: reply.provider.into(),
            model: reply.model,
        })
    }
}

/// The chat request, or a permanent failure naming the bad field.
pub fn request(input: &Input) -> Result<ChatRequest, Failure> {
    let message = match &input.message {
        Text::Plain(text) | Text::Cloud { body: text } => text,
    };
    let mut rest = input.rest.clone();
    rest.retain(|key, _| !ENVELOPE_FIELDS.contains(&key.as_str()));
    let facts = facts(input.context.as_ref(), &rest);
    let context = (!facts.is_empty()).then_some(("What the app knows about the user", &facts));
    let messages = conversation(PROMPT, context, &input.history, message)?;
    Ok(ChatRequest { temperature: Some(0.6), ..ChatRequest::new(messages) })
}

quern_sdk::export_handler!(WhatsappAiAssistant);

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> Input {
        quern_sdk::parse_input(json).unwrap_or_else(|_| panic!("{json}"))
    }

    #[test]
    fn a_meta_message_and_an_app_call_read_alike_and_nothing_is_dropped() {
        let meta = input(
            r#"{"from": "5511999998888", "id": "wamid.1", "timestamp": "1", "type": "text", "text": {"body": "Posso comer ovo?"}}"#,
        );
        let body = request(&meta).unwrap().body("m");
        assert_eq!(body["messages"].as_array().unwrap().len(), 2, "no context from Meta's envelope fields: {body}");
        let app = input(
            r#"{"phone": "+5511999998888", "message": "E no jantar?", "userName": "Ana",
                "history": [{"role": "user", "content": "oi"}, {"role": "bot", "content": "Olá!"}],
                "context": "vegetariana"}"#,
        );
        let body = request(&app).unwrap().body("m");
        let roles: Vec<&str> =
            body["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"], "`bot` is the assistant");
        let system = body["messages"][0]["content"].as_str().unwrap();
        assert!(system.contains(r#""notes":"vegetariana""#) && system.contains(r#""userName":"Ana""#), "{system}");
    }
}

//! `whatsapp_message`: sends one message through the WhatsApp Cloud API,
//! never twice for one job (see `quern-whatsapp`). The text is given, taken
//! from the job before in a pipeline (`previous`), or written by the AI
//! provider chain as a reply to an incoming message (`reply_to`).

use quern_ai::{ChatRequest, Message, chat};
use quern_sdk::serde_json::{Value, json};
use quern_sdk::{Failure, Handler, JobInfo, fail, retry};
use quern_whatsapp::{e164_digits, send, text_body};
use serde::{Deserialize, Serialize};

/// `{"to": "+5511999998888", "text": "…"}`, `{"to": …, "template": {…}}`, or
/// `{"to": …, "reply_to": "<the message they sent>"}` for an AI reply; in a
/// pipeline after another job, the text may come from its result
/// (`previous`: the assistant's `response`, an exam's `analysis`, or a
/// `text`). Other fields (the app sends `userId`) are ignored.
#[derive(Debug, Deserialize)]
pub struct Input {
    pub to: String,
    pub text: Option<String>,
    pub template: Option<Template>,
    pub reply_to: Option<String>,
    pub previous: Option<Value>,
}

/// The fields of a previous job's result that carry text to send, in order.
pub const PREVIOUS_TEXT_FIELDS: [&str; 3] = ["response", "analysis", "text"];

/// The longest incoming message answered.
pub const MAX_INCOMING_CHARS: usize = 4000;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    #[serde(default = "default_language")]
    pub language: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Value>,
}

fn default_language() -> String {
    "pt_BR".into()
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Output {
    pub message_id: String,
    pub to: String,
    pub status: &'static str,
    /// An AI reply: the text sent, and who wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

pub const REPLY_PROMPT: &str = "You are Sofia, the WhatsApp assistant of a nutrition and health app. Reply in the \
user's language, in at most three short sentences, kindly and practically. You do not diagnose or prescribe: for \
symptoms, medicines or exams, suggest seeing a health professional; for an emergency, tell them to call 192 (SAMU) \
or go to the nearest emergency room.";

pub struct WhatsappMessage;

impl Handler for WhatsappMessage {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let to = e164_digits(&input.to, "to")?;
        if let Some(incoming) = &input.reply_to {
            if input.text.is_some() || input.template.is_some() {
                return Err(fail("invalid input: give `reply_to` alone, without `text` or `template`"));
            }
            // The reply is written first; only then is anything sent.
            quern_sdk::progress(10, "writing the reply");
            let reply = chat(&reply_request(incoming)?)?;
            let text = reply.content.trim().to_string();
            if text.is_empty() {
                return Err(retry(format!("{} answered an empty reply", reply.provider)));
            }
            let sent = send(&text_body(&to, &text, "reply")?)?;
            return Ok(Output {
                message_id: sent.message_id,
                to: sent.to,
                status: sent.status,
                reply: Some(text),
                provider: Some(reply.provider.into()),
                model: Some(reply.model),
            });
        }
        let sent = send(&message_body(&to, &input)?)?;
        Ok(Output {
            message_id: sent.message_id,
            to: sent.to,
            status: sent.status,
            reply: None,
            provider: None,
            model: None,
        })
    }
}

/// The chat request answering an incoming message.
pub fn reply_request(incoming: &str) -> Result<ChatRequest, Failure> {
    let incoming = incoming.trim();
    if incoming.is_empty() {
        return Err(fail("invalid input: `reply_to` is empty"));
    }
    if incoming.chars().count() > MAX_INCOMING_CHARS {
        return Err(fail(format!("invalid input: `reply_to` is longer than {MAX_INCOMING_CHARS} characters")));
    }
    Ok(ChatRequest {
        temperature: Some(0.5),
        ..ChatRequest::new(vec![Message::system(REPLY_PROMPT), Message::user(incoming)])
    })
}

/// The Cloud API body for `to` (E.164 digits), or a permanent failure naming the bad field.
pub fn message_body(to: &str, input: &Input) -> Result<Value, Failure> {
    let text = match (&input.text, &input.template, &input.previous) {
        (None, None, Some(previous)) => Some(text_of_previous(previous)?),
        (text, _, _) => text.clone(),
    };
    match (&text, &input.template) {
        (Some(text), None) => text_body(to, text, "text"),
        (None, Some(template)) => {
            if template.name.trim().is_empty() {
                return Err(fail("invalid input: `template.name` is empty"));
            }
            let mut body = json!({"messaging_product": "whatsapp", "to": to, "type": "template",
                                  "template": {"name": template.name, "language": {"code": template.language}}});
            if !template.components.is_empty() {
                body["template"]["components"] = Value::Array(template.components.clone());
            }
            Ok(body)
        }
        (Some(_), Some(_)) => Err(fail("invalid input: give `text` or `template`, not both")),
        (None, None) => Err(fail("invalid input: `text`, `template` or `reply_to` is required")),
    }
}

/// The text a previous job's result carries (see [`PREVIOUS_TEXT_FIELDS`]).
fn text_of_previous(previous: &Value) -> Result<String, Failure> {
    PREVIOUS_TEXT_FIELDS
        .iter()
        .find_map(|field| previous.get(field).and_then(Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| {
            fail(format!(
                "invalid input: `previous` (the result of the job before) has no text to send in {}; give `text`",
                PREVIOUS_TEXT_FIELDS.map(|f| format!("`{f}`")).join(", ")
            ))
        })
}

quern_sdk::export_handler!(WhatsappMessage);

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> Input {
        quern_sdk::parse_input(json).unwrap_or_else(|_| panic!("{json}"))
    }

    #[test]
    fn text_and_template_bodies_follow_the_cloud_api() {
        let to = "5511999998888";
        let body = message_body(to, &input(r#"{"to": "+5511999998888", "text": " Olá! "}"#)).unwrap();
        assert_eq!(body["to"], "5511999998888");
        assert_eq!(body["text"]["body"], "Olá!");
        let body = message_body(to, &input(r#"{"to": "+5511999998888", "template": {"name": "lembrete"}}"#)).unwrap();
        assert_eq!(body["template"], json!({"name": "lembrete", "language": {"code": "pt_BR"}}));
        let error = message_body(to, &input(r#"{"to": "+5511999998888"}"#)).unwrap_err().expect_permanent();
        assert!(error.contains("`text`, `template` or `reply_to`"), "{error}");
    }

    #[test]
    fn a_previous_job_s_text_is_sent() {
        let to = "5511999998888";
        let body = message_body(to, &input(r#"{"to": "+55", "previous": {"analysis": "Glicose alta."}}"#)).unwrap();
        assert_eq!(body["text"]["body"], "Glicose alta.");
        assert!(
            message_body(to, &input(r#"{"to": "+55", "previous": {}}"#))
                .unwrap_err()
                .expect_permanent()
                .contains("`previous`")
        );
    }
}

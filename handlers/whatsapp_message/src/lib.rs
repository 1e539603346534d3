//! `whatsapp_message`: sends one message through the WhatsApp Cloud API
//! (`POST {WHATSAPP_API_URL}/{WHATSAPP_PHONE_NUMBER_ID}/messages`, Bearer
//! `WHATSAPP_TOKEN`).
//!
//! A message must not arrive twice, so the job is retried only when the
//! request certainly did not take effect: no connection was made, or the API
//! answered 429 or 503 (it refused before acting). When it may have taken
//! effect — a timeout after the request left, a broken connection, a 500 —
//! the job fails as "delivery unknown" instead of sending again. A 4xx fails
//! with the API's own error message.

use quern_sdk::http::{Error, post, retry_after_ms, snippet};
use quern_sdk::serde_json::{Value, json};
use quern_sdk::{Failure, Handler, JobInfo, fail, required_config, retry, retry_after};
use serde::{Deserialize, Serialize};

pub const DEFAULT_API_URL: &str = "https://graph.facebook.com/v21.0";
pub const MAX_TEXT_CHARS: usize = 4096;

/// `{"to": "+5511999998888", "text": "…"}` or `{"to": …, "template": {…}}`;
/// in a pipeline after another job, the text may come from its result
/// (`previous`: the assistant's `response`, an exam's `analysis`, or a
/// `text`). Other fields (the app sends `userId`) are ignored.
#[derive(Debug, Deserialize)]
pub struct Input {
    pub to: String,
    pub text: Option<String>,
    pub template: Option<Template>,
    pub previous: Option<Value>,
}

/// The fields of a previous job's result that carry text to send, in order.
pub const PREVIOUS_TEXT_FIELDS: [&str; 3] = ["response", "analysis", "text"];

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
}

pub struct WhatsappMessage;

impl Handler for WhatsappMessage {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let body = message_body(&input)?;
        let base = quern_sdk::config("WHATSAPP_API_URL").unwrap_or_else(|| DEFAULT_API_URL.into());
        let phone_id = required_config("WHATSAPP_PHONE_NUMBER_ID")?;
        let token = required_config("WHATSAPP_TOKEN")?;
        let request = post(format!("{}/{phone_id}/messages", base.trim_end_matches('/')))
            .bearer(&token)
            .json(&body)?
            .idempotent(false)
            .timeout_ms(timeout_ms())
            .build();
        let response = quern_sdk::http::send(&request).map_err(|error| sending_failed(&error))?;
        outcome(response.status, &response.body, retry_after_ms(&response), &body["to"])
    }
}

/// How long to wait for the API (`WHATSAPP_TIMEOUT_MS`, default 15 s): past
/// it, delivery is unknown and the job fails rather than send again.
fn timeout_ms() -> u32 {
    quern_sdk::config("WHATSAPP_TIMEOUT_MS").and_then(|v| v.trim().parse().ok()).unwrap_or(15_000)
}

/// The Cloud API body, or a permanent failure naming the bad field.
pub fn message_body(input: &Input) -> Result<Value, Failure> {
    let to = e164_digits(&input.to)?;
    let text = match (&input.text, &input.template, &input.previous) {
        (None, None, Some(previous)) => Some(text_of_previous(previous)?),
        (text, _, _) => text.clone(),
    };
    match (&text, &input.template) {
        (Some(text), None) => {
            let text = text.trim();
            if text.is_empty() {
                return Err(fail("invalid input: `text` is empty"));
            }
            if text.chars().count() > MAX_TEXT_CHARS {
                return Err(fail(format!(
                    "invalid input: `text` is longer than WhatsApp's {MAX_TEXT_CHARS} characters"
                )));
            }
            Ok(json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "text",
                      "text": {"preview_url": false, "body": text}}))
        }
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
        (None, None) => Err(fail("invalid input: `text` or `template` is required")),
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

/// `+5511999998888` → `5511999998888`.
pub fn e164_digits(to: &str) -> Result<String, Failure> {
    let digits = to.strip_prefix('+').unwrap_or("");
    let valid =
        (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    if valid {
        Ok(digits.to_string())
    } else {
        // The number itself is personal data: never quoted.
        Err(fail("invalid input: `to` is not an E.164 number like +5511999998888"))
    }
}

/// The host could not deliver the request. Retried only if it never left.
pub fn sending_failed(error: &Error) -> Failure {
    match error {
        Error::Connect(message) => retry(format!("could not reach the WhatsApp API (nothing was sent): {message}")),
        Error::Timeout(message) | Error::Protocol(message) => fail(format!(
            "delivery unknown: the request reached the WhatsApp API but no answer came back ({message}); \
             not resent, to avoid a duplicate message"
        )),
        Error::Denied(message) => fail(format!("the WhatsApp API host is not allowed: {message}")),
        Error::InvalidRequest(message) | Error::BodyTooLarge(message) => {
            fail(format!("the request is invalid: {message}"))
        }
    }
}

/// What the API's answer means for the job.
pub fn outcome(status: u16, body: &[u8], wait_ms: Option<u64>, to: &Value) -> Result<Output, Failure> {
    match status {
        200..=299 => {
            let id = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["messages"][0]["id"].as_str().map(str::to_string))
                .ok_or_else(|| {
                    fail(format!(
                        "the WhatsApp API accepted the message but its answer has no message id: {}",
                        snippet(body)
                    ))
                })?;
            Ok(Output { message_id: id, to: to.as_str().unwrap_or_default().to_string(), status: "accepted" })
        }
        429 | 503 => {
            let reason = format!("the WhatsApp API refused for now ({status}): {}", api_error(body));
            Err(match wait_ms {
                Some(ms) => retry_after(reason, ms),
                None => retry(reason),
            })
        }
        400..=499 => Err(fail(format!("the WhatsApp API refused the message ({status}): {}", api_error(body)))),
        _ => Err(fail(format!(
            "delivery unknown: the WhatsApp API answered {status} ({}); not resent, to avoid a duplicate message",
            api_error(body)
        ))),
    }
}

/// The Graph API's `error.message`, or the start of the body.
fn api_error(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| snippet(body))
}

quern_sdk::export_handler!(WhatsappMessage);

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> Input {
        quern_sdk::parse_input(json).unwrap_or_else(|_| panic!("{json}"))
    }

    fn reason(failure: Failure) -> String {
        match failure {
            Failure::Fail(reason) => reason,
            Failure::Retry(retry) => panic!("expected a permanent failure: {}", retry.reason),
        }
    }

    #[test]
    fn numbers_must_be_e164() {
        assert_eq!(e164_digits("+5511999998888").unwrap(), "5511999998888");
        for bad in ["5511999998888", "+55 11 99999", "+0123456789", "+12", "+1234567890123456"] {
            assert!(reason(e164_digits(bad).unwrap_err()).contains("`to`"), "{bad}");
        }
    }

    #[test]
    fn text_and_template_bodies_follow_the_cloud_api() {
        let body = message_body(&input(r#"{"to": "+5511999998888", "text": " Olá! "}"#)).unwrap();
        assert_eq!(body["to"], "5511999998888");
        assert_eq!(body["text"]["body"], "Olá!");
        let body = message_body(&input(r#"{"to": "+5511999998888", "template": {"name": "lembrete"}}"#)).unwrap();
        assert_eq!(body["template"], json!({"name": "lembrete", "language": {"code": "pt_BR"}}));
        assert!(
            reason(message_body(&input(r#"{"to": "+5511999998888"}"#)).unwrap_err()).contains("`text` or `template`")
        );
    }

    #[test]
    fn only_certain_non_delivery_is_retried() {
        let to = json!("5511999998888");
        assert!(matches!(outcome(429, b"{}", Some(2000), &to), Err(Failure::Retry(r)) if r.delay_ms == Some(2000)));
        assert!(matches!(sending_failed(&Error::Connect("refused".into())), Failure::Retry(_)));
        assert!(reason(sending_failed(&Error::Timeout("15 s".into()))).starts_with("delivery unknown"));
        assert!(reason(outcome(500, b"oops", None, &to).unwrap_err()).starts_with("delivery unknown"));
        let graph =
            br#"{"error": {"message": "(#131030) Recipient phone number not in allowed list", "code": 131030}}"#;
        assert!(reason(outcome(400, graph, None, &to).unwrap_err()).contains("(#131030) Recipient phone number"));
        let ok =
            outcome(200, br#"{"messaging_product": "whatsapp", "messages": [{"id": "wamid.X"}]}"#, None, &to).unwrap();
        assert_eq!(ok, Output { message_id: "wamid.X".into(), to: "5511999998888".into(), status: "accepted" });
    }
}

//! What the WhatsApp handlers share: one message through the WhatsApp Cloud
//! API (`POST {WHATSAPP_API_URL}/{WHATSAPP_PHONE_NUMBER_ID}/messages`, Bearer
//! `WHATSAPP_TOKEN`), sent at most once per job.
//!
//! A message must not arrive twice, so a send is retried only when the
//! request certainly did not take effect: no connection was made, or the API
//! answered 429 or 503 (it refused before acting). When it may have taken
//! effect — a timeout after the request left, a broken connection, a 500 —
//! the job fails as "delivery unknown" instead of sending again. A 4xx fails
//! with the API's own error message.

use base64::Engine as _;
use quern_sdk::http::{Error, check_status, failure_from_error, get, post, retry_after_ms, snippet};
use quern_sdk::serde_json::{Value, json};
use quern_sdk::{Failure, fail, required_config, retry, retry_after};
use serde::Serialize;

pub const DEFAULT_API_URL: &str = "https://graph.facebook.com/v21.0";
pub const MAX_TEXT_CHARS: usize = 4096;

/// A message the API accepted.
#[derive(Debug, Serialize, PartialEq)]
pub struct Sent {
    pub message_id: String,
    pub to: String,
    pub status: &'static str,
}

/// Sends a Cloud API message body once.
pub fn send(body: &Value) -> Result<Sent, Failure> {
    let base = quern_sdk::config("WHATSAPP_API_URL").unwrap_or_else(|| DEFAULT_API_URL.into());
    let phone_id = required_config("WHATSAPP_PHONE_NUMBER_ID")?;
    let token = required_config("WHATSAPP_TOKEN")?;
    let request = post(format!("{}/{phone_id}/messages", base.trim_end_matches('/')))
        .bearer(&token)
        .json(body)?
        .idempotent(false)
        .timeout_ms(timeout_ms())
        .build();
    let response = quern_sdk::http::send(&request).map_err(|error| sending_failed(&error))?;
    outcome(response.status, &response.body, retry_after_ms(&response), &body["to"])
}

/// A text message body for `to` (E.164 digits), or a permanent failure
/// naming `field` when the text is empty or too long.
pub fn text_body(to: &str, text: &str, field: &str) -> Result<Value, Failure> {
    let text = text.trim();
    if text.is_empty() {
        return Err(fail(format!("invalid input: `{field}` is empty")));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(fail(format!("invalid input: `{field}` is longer than WhatsApp's {MAX_TEXT_CHARS} characters")));
    }
    Ok(json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "text",
              "text": {"preview_url": false, "body": text}}))
}

/// The largest photo read from Meta's media host (WhatsApp caps images at 5 MB).
pub const MAX_MEDIA_BYTES: usize = 5 << 20;

/// A photo a user sent (`{"image": {"id": …}}` in a webhook message) as a
/// `data:` URL a vision model reads: its URL from the Graph API
/// (`GET {WHATSAPP_API_URL}/{media id}`), then its bytes, both with the
/// token (Meta's media URLs need it, so a model could not fetch them).
pub fn media_data_url(media_id: &str) -> Result<String, Failure> {
    if media_id.is_empty() || !media_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
        return Err(fail("invalid input: `image.id` is not a WhatsApp media id"));
    }
    let base = quern_sdk::config("WHATSAPP_API_URL").unwrap_or_else(|| DEFAULT_API_URL.into());
    let token = required_config("WHATSAPP_TOKEN")?;
    #[derive(serde::Deserialize)]
    struct Media {
        url: String,
        mime_type: Option<String>,
    }
    let media: Media = get(format!("{}/{media_id}", base.trim_end_matches('/')))
        .bearer(&token)
        .timeout_ms(timeout_ms())
        .send_json()?;
    let download = get(media.url).bearer(&token).timeout_ms(timeout_ms()).build();
    let response = quern_sdk::http::send(&download).map_err(|error| failure_from_error(&download, &error))?;
    check_status(&download, &response)?;
    if response.body.len() > MAX_MEDIA_BYTES {
        return Err(fail(format!("the photo is larger than {} MB", MAX_MEDIA_BYTES >> 20)));
    }
    let mime = media.mime_type.unwrap_or_else(|| "image/jpeg".into());
    Ok(format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&response.body)))
}

/// How long to wait for the API (`WHATSAPP_TIMEOUT_MS`, default 15 s): past
/// it, delivery is unknown and the job fails rather than send again.
fn timeout_ms() -> u32 {
    quern_sdk::config("WHATSAPP_TIMEOUT_MS").and_then(|v| v.trim().parse().ok()).unwrap_or(15_000)
}

/// `+5511999998888` → `5511999998888`; `field` names the input field.
pub fn e164_digits(number: &str, field: &str) -> Result<String, Failure> {
    let digits = number.strip_prefix('+').unwrap_or("");
    let valid =
        (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    if valid {
        Ok(digits.to_string())
    } else {
        // The number itself is personal data: never quoted.
        Err(fail(format!("invalid input: `{field}` is not an E.164 number like +5511999998888")))
    }
}

/// The digits of a message's sender (`from`), as the Cloud API writes them
/// (without `+`) or as an app may (with it).
pub fn sender_digits(from: &str) -> Result<String, Failure> {
    let from = from.trim();
    e164_digits(&if from.starts_with('+') { from.to_string() } else { format!("+{from}") }, "from")
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
pub fn outcome(status: u16, body: &[u8], wait_ms: Option<u64>, to: &Value) -> Result<Sent, Failure> {
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
            Ok(Sent { message_id: id, to: to.as_str().unwrap_or_default().to_string(), status: "accepted" })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_must_be_e164() {
        assert_eq!(e164_digits("+5511999998888", "to").unwrap(), "5511999998888");
        for bad in ["5511987654321", "+55 11 98765", "+0123456789", "+12", "+1234567890123456"] {
            let error = e164_digits(bad, "from").unwrap_err().expect_permanent();
            assert!(error.contains("`from`") && !error.contains(bad.trim_start_matches('+')), "{error}");
        }
    }

    #[test]
    fn only_certain_non_delivery_is_retried() {
        let to = json!("5511999998888");
        assert!(matches!(outcome(429, b"{}", Some(2000), &to), Err(Failure::Retry(r)) if r.delay_ms == Some(2000)));
        assert!(matches!(sending_failed(&Error::Connect("refused".into())), Failure::Retry(_)));
        assert!(sending_failed(&Error::Timeout("15 s".into())).expect_permanent().starts_with("delivery unknown"));
        assert!(outcome(500, b"oops", None, &to).unwrap_err().expect_permanent().starts_with("delivery unknown"));
        let graph =
            br#"{"error": {"message": "(#131030) Recipient phone number not in allowed list", "code": 131030}}"#;
        assert!(
            outcome(400, graph, None, &to).unwrap_err().expect_permanent().contains("(#131030) Recipient phone number")
        );
        let ok =
            outcome(200, br#"{"messaging_product": "whatsapp", "messages": [{"id": "wamid.X"}]}"#, None, &to).unwrap();
        assert_eq!(ok, Sent { message_id: "wamid.X".into(), to: "5511999998888".into(), status: "accepted" });
    }
}

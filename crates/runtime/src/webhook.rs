//! `[webhook]` in a manifest: a provider (Meta's WhatsApp Cloud API, a
//! payment processor, a form service) calls the type's legacy function
//! itself, with no user's token. The manifest says how each call proves it
//! comes from the provider and which parts of its body are jobs; the gateway
//! checks the proof and enqueues (crates/api/src/webhooks.rs).
//!
//! ```toml
//! function = "whatsapp-nutrition-webhook"
//! [webhook]
//! auth = "hmac-sha256"                     # or "token": the header holds the secret itself
//! header = "X-Hub-Signature-256"
//! prefix = "sha256="
//! secret = "WHATSAPP_APP_SECRET"           # a variable the host offers; never granted to the handler
//! verify_token = "WHATSAPP_VERIFY_TOKEN"   # answers Meta's GET subscription handshake
//! jobs_from = "entry[].changes[].value.messages[]"
//! kind_field = "type"
//! kinds = ["text", "image"]                # other kinds are acknowledged and ignored
//! ```

use serde::Deserialize;
use serde_json::Value;

use crate::manifest::{ManifestError, validate_config_key};

/// How a webhook call proves it comes from the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookAuth {
    /// The header holds the hex HMAC-SHA256 of the raw body, keyed with the secret.
    HmacSha256,
    /// The header holds the secret itself.
    Token,
}

/// A manifest's `[webhook]`, checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub auth: WebhookAuth,
    /// The request header carrying the signature or the token.
    pub header: String,
    /// Text before the signature's hex digits (`sha256=` for Meta).
    #[serde(default)]
    pub prefix: String,
    /// The variable holding the signing secret or the token. The gateway
    /// reads it; the handler sees it only if its `[config] keys` list it.
    pub secret: String,
    /// The variable holding the token of a `GET ?hub.mode=subscribe`
    /// handshake (Meta's); without it, GET is refused.
    pub verify_token: Option<String>,
    /// One job per element found at this path (`a[].b.c[]`: `[]` walks into
    /// an array); the whole body is one job when unset.
    pub jobs_from: Option<String>,
    /// The element field whose value says its kind.
    pub kind_field: Option<String>,
    /// The kinds that make jobs; others are acknowledged and ignored.
    #[serde(default)]
    pub kinds: Vec<String>,
}

impl Webhook {
    /// Refuses a declaration the gateway could not honour.
    pub fn check(&self, function: Option<&str>) -> Result<(), ManifestError> {
        let invalid = |reason: String| Err(ManifestError::Webhook(reason));
        if function.is_none() {
            return invalid("it serves the type's legacy function: set `function = \"…\"` too".into());
        }
        let header_name = !self.header.is_empty()
            && self.header.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !header_name {
            return invalid(format!("header = \"{}\" is not an HTTP header name", self.header));
        }
        validate_config_key(&self.secret)?;
        if let Some(key) = &self.verify_token {
            validate_config_key(key)?;
        }
        if let Some(path) = &self.jobs_from
            && segments(path).is_none()
        {
            return invalid(format!(
                "jobs_from = \"{path}\" is not a path: field names joined by `.`, each may end in `[]` \
                 (e.g. \"entry[].changes[].value.messages[]\")"
            ));
        }
        match (&self.kind_field, self.kinds.is_empty()) {
            (Some(_), true) => invalid("kind_field needs the kinds that make jobs: kinds = [\"text\"]".into()),
            (None, false) => invalid("kinds needs the field that holds the kind: kind_field = \"type\"".into()),
            _ => Ok(()),
        }
    }

    /// The parts of a body that are jobs, and how many elements were found
    /// but are of a kind that makes none (with those kinds, for the log).
    pub fn jobs_in(&self, body: &Value) -> Split {
        let found = match self.jobs_from.as_deref().and_then(segments) {
            Some(segments) => walk(body, &segments),
            None => vec![body.clone()],
        };
        let mut split = Split::default();
        for element in found {
            let kind = self.kind_field.as_ref().map(|field| element.get(field).and_then(Value::as_str).unwrap_or(""));
            match kind {
                Some(kind) if !self.kinds.iter().any(|k| k == kind) => split.ignored.push(kind.to_string()),
                _ => split.jobs.push(element),
            }
        }
        split
    }
}

/// A body's elements: the jobs to run and the kinds of those ignored.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    pub jobs: Vec<Value>,
    pub ignored: Vec<String>,
}

/// `a[].b` → `[("a", true), ("b", false)]`; `None` when malformed.
fn segments(path: &str) -> Option<Vec<(&str, bool)>> {
    path.split('.')
        .map(|segment| {
            let (name, each) = match segment.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (segment, false),
            };
            let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            plain.then_some((name, each))
        })
        .collect()
}

/// Every value at the path; a missing field or a non-array where `[]` is
/// asked yields nothing (a status-only envelope has no `messages`).
fn walk(body: &Value, segments: &[(&str, bool)]) -> Vec<Value> {
    let mut here = vec![body];
    for (name, each) in segments {
        here = here
            .into_iter()
            .filter_map(|value| value.get(name))
            .flat_map(|value| match (each, value) {
                (true, Value::Array(items)) => items.iter().collect::<Vec<_>>(),
                (true, _) => Vec::new(),
                (false, value) => vec![value],
            })
            .collect();
    }
    here.into_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta() -> Webhook {
        Webhook {
            auth: WebhookAuth::HmacSha256,
            header: "X-Hub-Signature-256".into(),
            prefix: "sha256=".into(),
            secret: "WHATSAPP_APP_SECRET".into(),
            verify_token: Some("WHATSAPP_VERIFY_TOKEN".into()),
            jobs_from: Some("entry[].changes[].value.messages[]".into()),
            kind_field: Some("type".into()),
            kinds: vec!["text".into(), "image".into()],
        }
    }

    #[test]
    fn meta_s_envelope_gives_one_job_per_message_of_a_known_kind() {
        let body = json!({"object": "whatsapp_business_account", "entry": [
            {"id": "1", "changes": [{"field": "messages", "value": {"messages": [
                {"from": "5511999998888", "id": "wamid.1", "type": "text", "text": {"body": "arroz"}},
                {"from": "5511999998888", "id": "wamid.2", "type": "reaction", "reaction": {"emoji": "👍"}}]}}]},
            {"id": "2", "changes": [{"field": "messages", "value": {"statuses": [{"status": "read"}]}},
                                    {"field": "messages", "value": {"messages": [
                {"from": "5511988887777", "id": "wamid.3", "type": "image", "image": {"id": "m1"}}]}}]}]});
        let split = meta().jobs_in(&body);
        let ids: Vec<_> = split.jobs.iter().map(|job| job["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["wamid.1", "wamid.3"]);
        assert_eq!(split.ignored, ["reaction"]);
    }

    #[test]
    fn a_declaration_the_gateway_could_not_honour_is_refused_with_the_fix() {
        assert!(meta().check(Some("whatsapp-nutrition-webhook")).is_ok());
        let error = meta().check(None).unwrap_err().to_string();
        assert!(error.contains("set `function = \"…\"`"), "{error}");
        let error = Webhook { jobs_from: Some("entry[].".into()), ..meta() }.check(Some("f")).unwrap_err();
        assert!(error.to_string().contains("is not a path"), "{error}");
        let error = Webhook { kind_field: None, ..meta() }.check(Some("f")).unwrap_err();
        assert!(error.to_string().contains("kind_field = \"type\""), "{error}");
        let error = Webhook { secret: "DATABASE_URL".into(), ..meta() }.check(Some("f")).unwrap_err();
        assert_eq!(error, ManifestError::ForbiddenKey("DATABASE_URL".into()));
    }

    #[test]
    fn without_a_path_the_whole_body_is_the_job() {
        let hook = Webhook { jobs_from: None, kind_field: None, kinds: Vec::new(), ..meta() };
        assert_eq!(hook.jobs_in(&json!({"a": 1})).jobs, [json!({"a": 1})]);
    }
}

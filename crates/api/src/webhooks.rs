//! A legacy function a provider calls itself (a manifest's `[webhook]`):
//! Meta's WhatsApp Cloud API calls `whatsapp-nutrition-webhook` with no
//! user's token, so the call proves itself instead, by the manifest's rule:
//! - `GET ?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…` is Meta's
//!   subscription handshake: the challenge is echoed when the token matches
//!   the variable `verify_token` names;
//! - `POST` carries a signature of its raw body (`hmac-sha256`: Meta's
//!   `X-Hub-Signature-256: sha256=<hex>`) or a static token, checked in
//!   constant time against the variable `secret` names before the body is
//!   even parsed. Then every job in it (`jobs_from`) is enqueued in one
//!   transaction and 200 answered at once: providers retry a slow or failed
//!   delivery, so the answer must not wait for the work. Elements of other
//!   kinds (status updates, reactions) are acknowledged and logged.
//!
//! The secrets are read from the variables the host offers (QUERN_VAR_…,
//! the handler config file, QUERN_HANDLER_ENV); the handler sees them only
//! when its `[config] keys` grant them. A secret the host does not offer
//! refuses every call (503): an unverifiable call never makes a job.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::AppState;
use super::auth::same_secret;
use super::body::{MAX_BODY_BYTES, parse};
use super::error::{ApiError, ErrorCode};
use super::jobs::ensure_enabled;
use quern_queue::EnqueueRequest;
use quern_queue::telemetry::JOBS_ENQUEUED;
use quern_runtime::manifest::Manifest;
use quern_runtime::webhook::{Webhook, WebhookAuth};

/// Serves a webhook call to `function`, which `manifest` declares.
pub async fn serve(state: &AppState, manifest: &Manifest, webhook: &Webhook, request: Request) -> Response {
    let function = manifest.function.as_deref().unwrap_or_default();
    let answer = match *request.method() {
        Method::GET => handshake(state, webhook, function, request.uri().query().unwrap_or_default()),
        Method::POST => deliver(state, manifest, webhook, request).await,
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("/functions/v1/{function} is a webhook: its provider sends POST (and GET to subscribe)"),
        )),
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// Meta's subscription handshake: the challenge, as plain text, when the
/// token matches.
fn handshake(state: &AppState, webhook: &Webhook, function: &str, query: &str) -> Result<Response, ApiError> {
    let Some(key) = &webhook.verify_token else {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("/functions/v1/{function} takes no GET handshake: its manifest names no verify_token"),
        ));
    };
    let expected = offered(state, function, key)?;
    let field = |name: &str| {
        url::form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
    };
    let (mode, token, challenge) = (field("hub.mode"), field("hub.verify_token"), field("hub.challenge"));
    match (mode.as_deref(), token, challenge) {
        (Some("subscribe"), Some(token), Some(challenge)) if same_secret(&expected, &token) => {
            tracing::info!(function, "webhook subscription verified");
            Ok((StatusCode::OK, [("content-type", "text/plain")], challenge).into_response())
        }
        (Some("subscribe"), Some(_), Some(_)) => {
            tracing::warn!(function, "webhook subscription refused: the verify token does not match");
            Err(ApiError::forbidden(format!("hub.verify_token does not match the value of {key}")))
        }
        _ => Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            "a subscription handshake sends hub.mode=subscribe, hub.verify_token and hub.challenge",
        )),
    }
}

/// Checks the call's proof, then enqueues its jobs in one transaction.
async fn deliver(
    state: &AppState,
    manifest: &Manifest,
    webhook: &Webhook,
    request: Request,
) -> Result<Response, ApiError> {
    let function = manifest.function.as_deref().unwrap_or_default();
    let secret = offered(state, function, &webhook.secret)?;
    let proof = request.headers().get(webhook.header.as_str()).map(|value| value.as_bytes().to_vec());
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BodyTooLarge, "the body exceeds 256 KiB")
    })?;
    if let Err(why) = check_proof(webhook, &secret, proof.as_deref(), &body) {
        tracing::warn!(function, why, "webhook call refused");
        return Err(ApiError::unauthorized(format!("{why}: the call does not come from the provider")));
    }
    let split = webhook.jobs_in(&parse::<Value>(&body)?);
    if !split.ignored.is_empty() {
        tracing::info!(function, ignored = split.ignored.len(), kinds = ?split.ignored, "webhook elements of other kinds acknowledged");
    }
    let caller = format!("webhook:{function}");
    let requests = split.jobs.into_iter().map(|input| EnqueueRequest {
        user_id: caller.clone(),
        job_type: manifest.job_type.clone(),
        input,
        priority: None,
        max_attempts: Some(manifest.max_attempts as i32),
        next: Vec::new(),
    });
    // A bad element (not an object, a NUL character) could never run:
    // dropped with a warning rather than failing the delivery, which the
    // provider would retry for days with the good ones in it.
    let mut jobs = Vec::new();
    for request in requests {
        match state.queue.validate_batch(vec![request]) {
            Ok(mut valid) => jobs.append(&mut valid),
            Err(error) => tracing::warn!(function, %error, "a webhook element that cannot be a job was dropped"),
        }
    }
    if !jobs.is_empty() {
        ensure_enabled(state, &manifest.job_type)?;
        state.queue.insert_batch(&jobs).await?;
        metrics::counter!(JOBS_ENQUEUED, "type" => manifest.job_type.clone()).increment(jobs.len() as u64);
    }
    let ids: Vec<_> = jobs.iter().map(|job| job.id).collect();
    tracing::info!(function, jobs = ids.len(), "webhook call accepted");
    Ok((StatusCode::OK, axum::Json(json!({ "received": true, "jobs": ids, "ignored": split.ignored.len() })))
        .into_response())
}

/// Whether the header proves the body comes from the holder of `secret`.
fn check_proof(webhook: &Webhook, secret: &str, proof: Option<&[u8]>, body: &Bytes) -> Result<(), &'static str> {
    let proof = proof.ok_or("the signature header is missing")?;
    match webhook.auth {
        WebhookAuth::Token => {
            let given = std::str::from_utf8(proof).map_err(|_| "the token is not text")?;
            if same_secret(secret, given) { Ok(()) } else { Err("the token does not match") }
        }
        WebhookAuth::HmacSha256 => {
            let hex_digits = proof.strip_prefix(webhook.prefix.as_bytes()).ok_or("the signature lacks its prefix")?;
            let signature = hex::decode(hex_digits).map_err(|_| "the signature is not hex")?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| "the secret is unusable")?;
            mac.update(body);
            // verify_slice compares in constant time.
            mac.verify_slice(&signature).map_err(|_| "the signature does not match the body")
        }
    }
}

/// The value of a variable the webhook needs, or 503 naming it.
fn offered(state: &AppState, function: &str, key: &str) -> Result<String, ApiError> {
    state.registry.runtime().settings().config.get(key).filter(|value| !value.is_empty()).ok_or_else(|| {
        tracing::error!(function, variable = key, "a webhook's secret is not offered; every call is refused");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::WebhookSecretMissing,
            format!("/functions/v1/{function} cannot check its calls: offer {key} (QUERN_VAR_{key})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Webhook {
        serde_json::from_value(
            json!({"auth": "hmac-sha256", "header": "X-Hub-Signature-256", "prefix": "sha256=", "secret": "S"}),
        )
        .unwrap()
    }

    fn signed(secret: &str, body: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes())).into_bytes()
    }

    #[test]
    fn a_signature_holds_for_its_body_and_secret_only() {
        let body = Bytes::from_static(br#"{"object":"whatsapp_business_account"}"#);
        let good = signed("app-secret", &body);
        assert_eq!(check_proof(&meta(), "app-secret", Some(&good), &body), Ok(()));
        assert!(check_proof(&meta(), "other-secret", Some(&good), &body).is_err());
        let mut changed = body.to_vec();
        changed[3] ^= 1;
        assert!(check_proof(&meta(), "app-secret", Some(&good), &Bytes::from(changed)).is_err());
        assert_eq!(check_proof(&meta(), "app-secret", None, &body), Err("the signature header is missing"));
        let unprefixed = good[7..].to_vec();
        assert_eq!(check_proof(&meta(), "app-secret", Some(&unprefixed), &body), Err("the signature lacks its prefix"));
    }
}

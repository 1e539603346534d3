//! `JsonBody<T>`: a JSON request body with errors a caller can act on —
//! 415 naming the content type to send, 413 naming the limit, 400 naming
//! the line and column of malformed JSON or the field that does not fit.

use crate::error::ErrorCode;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 256 << 10;

pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !is_json(content_type) {
            let got = if content_type.is_empty() { "none".to_string() } else { format!("`{content_type}`") };
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                format!("send the body as JSON with `Content-Type: application/json` (got {got})"),
            ));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::BodyTooLarge,
                    format!(
                        "the body exceeds this route's limit ({} KiB for a job, {} MiB for a batch); \
                         send references (URLs) instead of large data",
                        MAX_BODY_BYTES >> 10,
                        super::batch::MAX_BATCH_BODY_BYTES >> 20
                    ),
                )
            } else {
                ApiError::bad_request(ErrorCode::UnreadableBody, format!("could not read the body: {rejection}"))
            }
        })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a body, naming where and why it does not fit `T`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request(ErrorCode::InvalidRequest, format!("invalid body: {error}"))
        }
        _ => ApiError::bad_request(ErrorCode::InvalidJson, format!("malformed JSON: {error}")),
    })
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Query parameters, with a JSON error naming the parameter that does not parse.
/// An optional integer that may arrive as `2` or `2.0`: JSON Schema (and
/// JavaScript) call both integers, serde's `i64` only the first.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else { return Ok(None) };
    if let Some(whole) = number.as_i64() {
        return Ok(Some(whole));
    }
    match number.as_f64() {
        Some(float) if float.fract() == 0.0 && float.abs() < 9.0e15 => Ok(Some(float as i64)),
        _ => Err(serde::de::Error::custom(format!("{number} is not a whole number"))),
    }
}

pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::bad_request(ErrorCode::InvalidQuery, rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("Application/JSON"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let error = parse::<serde_json::Value>(b"{\"type\": \"echo\",\n \"input\": }").unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidJson);
        assert!(error.message.contains("line 2 column"), "{}", error.message);
    }
}

//! Outbound HTTP through the host (`quern:handler/http`).
//!
//! The host enforces the manifest's allowlist, timeouts, retries and body cap;
//! this module adds a request builder and JSON helpers that turn HTTP outcomes
//! into the job's [`Failure`]: 429 and 5xx are transient (`retry`, keeping the
//! upstream's `Retry-After`), other 4xx are permanent (`fail`).

use crate::{Failure, fail, retry, retry_after};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::bindings::quern::handler::http::{Error, Method, Request, Response};

impl Method {
    /// The method's name as sent on the wire (`other` as given).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Patch => "PATCH",
            Self::Options => "OPTIONS",
            Self::Other(name) => name,
        }
    }
}

impl Response {
    /// A response as an upstream would send it: for unit tests of code that
    /// reads responses (`check_status`, `decode_json`, a handler's parser).
    pub fn new(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: headers.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
            body: body.into(),
        }
    }
}

impl From<&str> for Method {
    /// A method by name, in any case; an unknown name becomes `other`, as given.
    fn from(name: &str) -> Self {
        match name.to_ascii_uppercase().as_str() {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "PATCH" => Self::Patch,
            "OPTIONS" => Self::Options,
            _ => Self::Other(name.to_string()),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sends a request as is.
pub fn send(request: &Request) -> Result<Response, Error> {
    crate::bindings::quern::handler::http::send(request)
}

/// Starts a GET request.
pub fn get(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Get, url)
}

/// Starts a POST request.
pub fn post(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Post, url)
}

/// Builds a [`Request`].
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    request: Request,
}

impl RequestBuilder {
    /// A request with `method` (a [`Method`] or its name: `"GET"`, `"PROPFIND"`).
    pub fn new(method: impl Into<Method>, url: impl Into<String>) -> Self {
        Self {
            request: Request {
                method: method.into(),
                url: url.into(),
                headers: Vec::new(),
                body: None,
                timeout_ms: None,
                idempotent: None,
            },
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.request.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.request.body = Some(body.into());
        self
    }

    /// Sets a JSON body and its content type.
    pub fn json<B: Serialize + ?Sized>(self, body: &B) -> Result<Self, Failure> {
        let bytes =
            serde_json::to_vec(body).map_err(|error| fail(format!("could not encode request body: {error}")))?;
        Ok(self.header("content-type", "application/json").body(bytes))
    }

    pub fn timeout_ms(mut self, timeout_ms: u32) -> Self {
        self.request.timeout_ms = Some(timeout_ms);
        self
    }

    /// Gives the request at most nine tenths of the time the attempt has
    /// left (the host caps it further at its own maximum). A slow upstream
    /// then ends as a `timeout` the handler turns into a retry, before the
    /// host stops the attempt at its deadline, which would fail it for good.
    pub fn within(self, job: &crate::JobInfo) -> Self {
        let left = u32::try_from(job.remaining().as_millis()).unwrap_or(u32::MAX);
        self.timeout_ms((left / 10 * 9).max(1))
    }

    /// Declares whether sending twice is harmless (see the WIT `request` docs).
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.request.idempotent = Some(idempotent);
        self
    }

    pub fn build(self) -> Request {
        self.request
    }

    /// Sends the request; the error is the host's, unclassified.
    pub fn send(&self) -> Result<Response, Error> {
        send(&self.request)
    }

    /// Sends the request and decodes a successful JSON response; every other
    /// outcome becomes a [`Failure`] (see [`check_status`], [`failure_from_error`]).
    pub fn send_json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        let response = self.send().map_err(|error| failure_from_error(&self.request, &error))?;
        decode_json(&self.request, &response)
    }
}

/// GETs `url` and decodes its JSON response.
pub fn get_json<T: DeserializeOwned>(url: &str) -> Result<T, Failure> {
    get(url).send_json()
}

/// POSTs `body` as JSON to `url` and decodes its JSON response.
pub fn post_json<T: DeserializeOwned, B: Serialize + ?Sized>(url: &str, body: &B) -> Result<T, Failure> {
    post(url).json(body)?.send_json()
}

/// Decodes a response: 2xx as JSON of `T`, anything else per [`check_status`].
pub fn decode_json<T: DeserializeOwned>(request: &Request, response: &Response) -> Result<T, Failure> {
    check_status(request, response)?;
    serde_json::from_slice(&response.body).map_err(|error| {
        retry(format!(
            "{} {} answered {} with a body that is not the expected JSON: {error}; body starts: {}",
            request.method,
            request.url,
            response.status,
            snippet(&response.body)
        ))
    })
}

/// Turns a non-2xx response into a failure: 429 and 5xx are transient (with
/// the upstream's `Retry-After`, in seconds, as the delay), other statuses are
/// permanent.
pub fn check_status(request: &Request, response: &Response) -> Result<(), Failure> {
    let status = response.status;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let reason = format!("{} {} answered {status}: {}", request.method, request.url, snippet(&response.body));
    if status == 429 || status >= 500 {
        Err(match retry_after_ms(response) {
            Some(delay_ms) => retry_after(reason, delay_ms),
            None => retry(reason),
        })
    } else {
        Err(fail(reason))
    }
}

/// The response's `Retry-After`, in milliseconds, when it is a number of seconds.
pub fn retry_after_ms(response: &Response) -> Option<u64> {
    header(response, "retry-after")?.trim().parse::<u64>().ok().map(|seconds| seconds * 1000)
}

/// The first value of a response header (names compare case-insensitively).
pub fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
}

/// Classifies a host error: refusals and malformed requests are permanent;
/// connect errors, timeouts and broken connections are transient.
pub fn failure_from_error(request: &Request, error: &Error) -> Failure {
    let target = format!("{} {}", request.method, request.url);
    match error {
        Error::Denied(message) => fail(format!("{target} denied: {message}")),
        Error::InvalidRequest(message) => fail(format!("{target} is invalid: {message}")),
        Error::BodyTooLarge(message) => fail(format!("{target}: {message}")),
        Error::Connect(message) => retry(format!("{target} could not connect: {message}")),
        Error::Timeout(message) => retry(format!("{target} timed out: {message}")),
        Error::Protocol(message) => retry(format!("{target} failed: {message}")),
    }
}

/// The start of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    if body.len() > MAX { format!("{text}…") } else { text.into_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_leaves_a_tenth_of_the_attempt_for_the_handler() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let job = |deadline_unix_ms| crate::JobInfo {
            id: "j".into(),
            job_type: "t".into(),
            attempt: 1,
            max_attempts: 1,
            deadline_unix_ms,
        };
        let timeout = get("http://x.test").within(&job(now + 10_000)).build().timeout_ms.unwrap();
        assert!((8_500..=9_000).contains(&timeout), "{timeout} ms of 10 s left");
        let past = get("http://x.test").within(&job(now.saturating_sub(1))).build().timeout_ms;
        assert_eq!(past, Some(1), "an attempt past its deadline still sends with the least timeout");
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response::new(status, headers, body)
    }

    #[test]
    fn rate_limit_is_transient_and_keeps_retry_after() {
        let request = get("http://upstream/x").build();
        match check_status(&request, &response(429, &[("Retry-After", "2")], "slow down")) {
            Err(Failure::Retry(retry)) => {
                assert_eq!(retry.delay_ms, Some(2000));
                assert!(retry.reason.contains("429"), "{}", retry.reason);
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }

    #[test]
    fn client_error_is_permanent() {
        let request = get("http://upstream/x").build();
        assert!(matches!(
            check_status(&request, &response(400, &[], "bad")),
            Err(Failure::Fail(reason)) if reason.contains("400: bad")
        ));
    }

    #[test]
    fn server_error_is_transient() {
        let request = get("http://upstream/x").build();
        assert!(matches!(check_status(&request, &response(503, &[], "")), Err(Failure::Retry(_))));
    }

    #[test]
    fn denial_is_permanent_and_timeout_transient() {
        let request = get("http://upstream/x").build();
        assert!(matches!(failure_from_error(&request, &Error::Denied("no".into())), Failure::Fail(_)));
        assert!(matches!(failure_from_error(&request, &Error::Timeout("slow".into())), Failure::Retry(_)));
    }
}
